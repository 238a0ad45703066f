"""RunSpec: recipe defaults, stable keys, and one-line errors for bad values."""

import re

import pytest

from kd.spec import RunSpec, SpecError
from kd.tracking.runs import same_param


def test_defaults_are_the_recipe():
    spec = RunSpec.create(dataset="cifar100", model="ResNet112", role="teacher")
    assert (spec.epochs, spec.batch_size, spec.lr, spec.momentum, spec.weight_decay) == (150, 128, 0.1, 0.9, 5e-4)
    assert (spec.schedule, spec.temperature, spec.label_smoothing, spec.alpha) == ("cosine", 4.0, 0.1, 0.0)


def test_kd_runs_have_no_label_smoothing_and_alpha_half_by_default():
    spec = RunSpec.create(dataset="cifar100", model="ResNet56", teacher="ResNet112", method="logit")
    assert spec.label_smoothing == 0.0 and spec.alpha == 0.5 and spec.role == "student"


def test_key_is_stable_and_changes_with_any_field():
    a = RunSpec.create(dataset="digits", model="ResNet8", teacher="ResNet20", method="logit", alpha=0.25)
    b = RunSpec.create(alpha=0.25, method="logit", teacher="ResNet20", model="ResNet8", dataset="digits")
    assert a.key() == b.key() and len(a.key()) == 16
    assert a.replace(seed=1).key() != a.key()
    assert RunSpec.from_dict(a.to_dict()) == a


@pytest.mark.parametrize(
    ("values", "needle"),
    [
        (dict(dataset="imagenet"), "unknown dataset 'imagenet'"),
        (dict(model="ResNet9000"), "unknown model 'ResNet9000'"),
        (dict(method="magic", teacher="ResNet20"), "unknown method 'magic'"),
        (dict(method="logit", teacher="ResNet20", alpha=1.5), "alpha 1.5 is outside [0, 1]"),
        (dict(method="logit"), "needs a teacher"),
        (dict(method="pure", alpha=0.5), "drop --alpha"),
        (dict(epochs=0), "epochs must be at least 1"),
        (dict(epochs="2"), "epochs '2' is not a whole number: pass --epochs like 150"),
        (dict(epochs=True), "epochs True is not a whole number"),
        (dict(lr=float("nan")), "lr nan is not a finite number: pass --lr a number"),
        (dict(method="rkd", teacher="ResNet20", options={"rkd_angle_weight": float("inf")}),
         "rkd_angle_weight inf is not a finite number"),
        (dict(options={1: 2}), "options {1: 2} is not a mapping of option names to values"),
        (dict(milestones="60,120"), "milestones '60,120' is not a list of whole numbers: pass --milestones like 60,120"),
        (dict(epochs=2, schedule="multistep", milestones=(5, 1)), "milestones 5,1 must be strictly increasing"),
        (dict(epochs=9, milestones=(3, 3)), "milestones 3,3 must be strictly increasing"),
        (dict(epochs=9, milestones=(0, 3)), "from 1 to epochs (9)"),
        (dict(seed=-1), "seed -1 is outside [0, 2147483648)"),
        (dict(momentum=-0.9), "momentum -0.9 is negative: pass --momentum >= 0"),
        (dict(role="teacher", init_weights="~no-such-user-here/w.pth"), "no such home directory here"),
    ],
)
def test_bad_values_give_one_line(values, needle):
    with pytest.raises(SpecError) as err:
        RunSpec.create(dataset=values.pop("dataset", "digits"), model=values.pop("model", "ResNet8"), **values)
    assert needle in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(("method", "options", "needle"), [
    ("rkd", {"rkd_distance_weight": -25.0}, "rkd option rkd_distance_weight=-25.0 is out of range: pass "
                                            "--rkd-distance-weight >= 0"),
    ("dkd", {"dkd_beta": -8.0}, "pass --dkd-beta >= 0"),
    ("attention_transfer", {"at_reduction": "max"}, "pass --at-reduction one of sum, mean"),
    ("attention_transfer", {"at_p": 0.0}, "pass --at-p > 0"),
    ("tucker", {"tucker_spatial_rank": 0}, "pass --tucker-spatial-rank >= 1"),
    ("factor_transfer", {"ft_pretrain_epochs": -1}, "pass --ft-pretrain-epochs >= 0"),
    ("fitnets", {"hint_stage": 2.5}, "fitnets option hint_stage=2.5 is not an int: pass --hint-stage like 2"),
    ("nst", {"nst_weight": "50"}, "nst option nst_weight='50' is not a float"),
    ("dkd", {"dkd_warmup": True}, "dkd option dkd_warmup=True is not an int"),
])  # fmt: skip
def test_method_options_are_checked_when_the_spec_is_made(method, options, needle):
    with pytest.raises(SpecError, match=re.escape(needle)):
        RunSpec.create(dataset="digits", model="ResNet8", teacher="ResNet20", method=method, options=options)


def test_milestones_within_the_epochs_are_a_spec():
    spec = RunSpec.create(dataset="digits", model="ResNet8", epochs=9, schedule="multistep", milestones=[1, 5, 9])
    assert spec.milestones == (1, 5, 9) and RunSpec.from_dict(spec.to_dict()) == spec


def test_whole_numbers_for_float_options_give_the_same_spec():
    """A YAML grid's `rkd_angle_weight: 50` is the CLI's 50.0: same key, same run."""
    as_int, as_float = (RunSpec.create(dataset="digits", model="ResNet8", teacher="ResNet20", method="rkd",
                                       options={"rkd_angle_weight": value}) for value in (50, 50.0))
    assert as_int == as_float and as_int.key() == as_float.key()
    assert type(as_int.options["rkd_angle_weight"]) is float


@pytest.mark.parametrize(("typed", "written", "same"), [
    ("1", "1.0", True), (".25", "0.25", True), ("50", "50.0", True), ("60,120", "(60, 120)", True),
    ("logit", "logit", True), ("0.5", "0.25", False), ("nst", "logit", False), ("60", "(60, 120)", False),
])  # fmt: skip
def test_mlflow_run_params_as_typed_match_the_spec_as_written(typed, written, same):
    """`mlflow run -P alpha=1` logs '1'; the spec writes '1.0'. MLflow refuses to change a param."""
    assert same_param(typed, written) is same


def test_keys_of_existing_runs_survive_fields_and_options_added_since() -> None:
    """Stores hold runs keyed by kd before teacher_recipe, ce_weight and the logit-standardisation
    options existed: those specs keep their keys, or every submit round would train them again.
    The keys were recorded with kd at commit 14250e0 (the format the stores hold, not a result)."""
    recorded = {"logit": "91d735bffdeeb2af", "dkd": "d774ba2252f72f33", "rkd": "4087c019162c81df",
                "nst": "da3876736e947b73"}
    for method, key in recorded.items():
        spec = RunSpec.create(dataset="cifar100", model="ResNet56", teacher="ResNet112", method=method, alpha=0.25)
        assert spec.key() == key, method
    assert RunSpec.create(dataset="cifar100", model="ResNet112", role="teacher").key() == "c22572b930975039"
    logit = RunSpec.create(dataset="cifar100", model="ResNet56", teacher="ResNet112", method="logit", alpha=0.25)
    changed = [logit.replace(options={**logit.options, "logit_standardize": True}), logit.replace(ce_weight=1.0),
               logit.replace(teacher_recipe={"epochs": 40})]
    assert len({s.key() for s in [logit, *changed]}) == 4  # a value set is part of the key
