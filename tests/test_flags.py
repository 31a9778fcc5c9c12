import math
import os
from pathlib import Path

import pytest
import torch
from conftest import QUICK, narrow_network, run_cli

from alexnet_dist.checkpoint import save_weights
from alexnet_dist.cli import main, parse_flags
from alexnet_dist.config import DEFAULTS, FIELDS, Number, UsageError
from alexnet_dist.model import alexnet


@pytest.mark.parametrize("argv", [["--resize=[70,70]"], ["--resize", "70,70"], ["--resize", "70"], ["--resize=70x70"]])
def test_list_forms(argv):
    assert parse_flags(argv).resize == (70, 70)


def test_list_flags_take_their_bounds():
    """The smallest crop AlexNet takes (63) and a mean of 0 are taken; one less is refused (BAD_INPUTS)."""
    cfg = parse_flags(["--resize", "63", "--random_crop", "63", "--mean", "0,0,0", "--std", "1e-9,1,1"])
    assert cfg.resize == cfg.random_crop == (63, 63) and cfg.mean == (0.0, 0.0, 0.0) and cfg.std[0] == 1e-9


def test_triples_booleans_and_defaults():
    cfg = parse_flags(["--mean", "0.4,0.5,0.6", "--std=[0.2,0.2,0.2]", "--notrain", "--load_model_path", "w.pth",
                       "--nesterov=False", "--tags", "a,b", "--flip", "Alternate"])
    assert cfg.mean == (0.4, 0.5, 0.6) and cfg.std == (0.2, 0.2, 0.2) and cfg.flip == "alternate"
    assert cfg.train is False and cfg.nesterov is False and cfg.tags == ("a", "b")
    assert parse_flags([]).to_dict() == {**DEFAULTS, "tags": ()}


def test_predict_takes_a_list_of_files_as_the_readme_writes_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("a.jpg", "b.png", "c,d.jpg"):
        (tmp_path / name).write_bytes(b"")
    weights = ["--load_model_path", "model.pth"]
    for given in (["--predict", "[a.jpg,b.png]"], ["--predict", "a.jpg,b.png"], ["--predict", "a.jpg, b.png"],
                  ["--predict=[a.jpg,b.png]"], ["--predict", '["a.jpg","b.png"]']):
        assert parse_flags(given + weights).predict == ("a.jpg", "b.png"), given
    assert parse_flags(["--predict", "c,d.jpg"] + weights).predict == ("c,d.jpg",)  # an existing name with a comma
    assert parse_flags(["--predict", "photos/"] + weights).predict == ("photos/",)


@pytest.mark.parametrize("project,tags", [("team/alexnet", ()), ("a:b", ()), ("p" * 128, ()), ("p" * 129, ()),
                                          ("alexnet-cifar10", ("x" * 64,)), ("alexnet-cifar10", ("x" * 65,))])
def test_wandb_project_and_tags_are_refused_exactly_when_wandb_refuses_them(project, tags):
    """The check runs before anything is written; W&B itself refuses only in wandb.init, after the run folder."""
    import wandb

    from alexnet_dist.config import UsageError
    from alexnet_dist.tracking import check_logger

    def refused(check) -> bool:
        try:
            check()
        except (UsageError, wandb.errors.UsageError, ValueError):  # pydantic's ValidationError is a ValueError
            return True
        return False

    assert refused(lambda: check_logger("wandb", project, tags)) == refused(
        lambda: wandb.Settings(project=project, run_tags=tags))


def test_names_that_fire_reads_as_numbers_stay_names():
    cfg = parse_flags(["--data_dir", "2024", "--save", "5", "--project", "7", "--run_name", "12"])
    assert (cfg.data_dir, cfg.save, cfg.project, cfg.run_name) == ("2024", "5", "7", "12")
    assert parse_flags(["--data_dir", "'1e3'"]).data_dir == "1e3"  # quoted, as the error for 1e3 says


def test_help_lists_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr()
    shown = text.out + text.err
    missing = [name for name in DEFAULTS if f"--{name}" not in shown]
    assert not missing, missing


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Weights files for the bad-input table, kept outside the folder the run starts in."""
    folder = tmp_path_factory.mktemp("weights")
    with narrow_network():  # the width of the runs that read them: what they refuse is the columns and the classes
        models = [("two_columns.pth", alexnet(groups=2)), ("five_classes.pth", alexnet(num_classes=5))]
    for name, model in models:
        save_weights(folder / name, model, {}, [str(i) for i in range(model.classifier[-1].out_features)])
    (folder / "notes.txt").write_text("not weights")
    torch.save({"something": "else"}, folder / "other.pth")
    return folder


BAD_INPUTS = [
    (["--no_such_flag", "1"], "unknown flag --no_such_flag (run with --help for the list of flags)"),
    (["--epochs", "3"], "unknown flag --epochs (did you mean --num_epochs?)"),
    (["--batchsize", "64"], "unknown flag --batchsize (did you mean --batch_size?)"),
    (["stray"], "unexpected argument stray"),
    (["--val_size", "-0.1"], "--val_size must be in [0.0, 1.0)"),
    (["--val_size", "1"], "--val_size"),
    (["--fraction_of_data", "0"], "--fraction_of_data must be in (0.0, 1.0]"),
    (["--fraction_of_data", "1.5"], "--fraction_of_data"),
    (["--batch_size", "0"], "--batch_size must be at least 1"),
    (["--batch_size", "-8"], "--batch_size"),
    (["--batch_size", "30", "--grad_accum_steps", "4"], "use a multiple of 4"),
    (["--random_crop", "80"], "--random_crop 80,80 is larger than --resize 70,70"),
    (["--random_crop", "32", "--resize", "32"], "at least 63x63"),
    (["--random_crop", "62"], "--random_crop must be at least 63x63, AlexNet's smallest input; got 62,62"),
    (["--resize", "0"], "--resize must be at least 1, got 0"),
    (["--resize", "70,-1"], "--resize must be at least 1, got -1"),
    (["--resize", "70,70,70"], "--resize must be one size or two (H,W)"),
    (["--mean", "0.5,-0.1,0.5"], "--mean must be at least 0.0, got -0.1"),
    (["--first_linear_once", "--resize", "100", "--random_crop", "95"], "--first_linear_once needs crops of at most"),
    (["--mean", "0.5,0.5"], "--mean must be three numbers"),
    (["--std", "0.5,0,0.5"], "--std must be greater than 0.0"),
    (["--std", "1,2,3,4"], "--std must be three numbers"),
    (["--num_epochs", "0"], "--num_epochs must be at least 1"),
    (["--batch_size", "abc"], "--batch_size must be an integer"),
    (["--logger", "wandb", "--project", "team/alexnet"], "--project 'team/alexnet': W&B takes at most 128 characters"),
    (["--logger", "wandb", "--tags", "ok," + "x" * 65], "W&B takes tags of at most 64 characters, got 65"),
    (["--data_dir", "1e3"], "--data_dir must be a text, got 1000.0; quote a name"),
    (["--batch_size", "1e999"], "--batch_size must be an integer"),  # fire reads an infinity, int() overflows
    (["--save", "{{time.year}}.pth"], "the only placeholder allowed is {time}"),
    (["--groups", "3"], "--groups must be one of 1, 2"),
    (["--flip", "sometimes"], "--flip must be True, False or alternate, got 'sometimes'"),
    (["--device", "cuda"], "--device cuda: no GPU"),
    (["--device", "tpu"], "--device must be one of auto, cpu, cuda"),
    (["--mixed_precision", "fp16", "--device", "cpu"], "fp16 needs a GPU"),
    (["--dataset", "folder", "--data_dir", "nowhere"], "--data_dir nowhere does not exist"),
    (["--dataset", "folder", "--data_dir", "."], "has no train/ folder"),
    (["--train=False"], "--load_model_path"),
    (["--load_model_path", "missing.pth"], "missing.pth does not exist"),
    (["--load_model_path", "{weights}/notes.txt"], "is not a weights file"),
    (["--load_model_path", "{weights}/other.pth"], "is not a weights file"),
    (["--load_model_path", "{weights}/two_columns.pth"], "groups=2 and 10 classes"),
    (["--load_model_path", "{weights}/five_classes.pth", "--train=False"], "groups=1 and 5 classes"),
    (["--save", "."], "--save . is a folder: give a file path such as ./model.pth"),
    (["--save", "{weights}/notes.txt/model.pth"], "/notes.txt/model.pth cannot be written ("),
    (["--predict", "x.jpg", "--load_model_path", "{weights}/two_columns.pth", "--predict_json",
      "{weights}/notes.txt/out.json"], "/notes.txt/out.json cannot be written ("),
    (["--predict", "x.jpg", "--load_model_path", "{weights}/two_columns.pth", "--parallel", "columns",
      "--groups", "2"], "--predict runs the whole network on the main process: drop --parallel columns"),
]


@pytest.mark.xdist_group("weights")  # on one worker, so that the module's weights files are written once
@pytest.mark.parametrize("argv,message", BAD_INPUTS, ids=[" ".join(argv) for argv, _ in BAD_INPUTS])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(argv, message, weights, capsys, tmp_path):
    argv = [arg.format(weights=weights) for arg in argv]
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(SystemExit) as exit_info:
        main(QUICK + argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert sorted(os.listdir(tmp_path)) == before


WANDB_ENVIRONMENT = [
    ("WANDB_MODE", "bogus", "WANDB_MODE='bogus' in the environment: W&B refuses it (Input should be 'online', "),
    ("WANDB_SILENT", "maybe", "WANDB_SILENT='maybe' in the environment: W&B refuses it"),
    ("WANDB_HTTP_TIMEOUT", "soon", "WANDB_HTTP_TIMEOUT='soon' in the environment: W&B refuses it"),
]


@pytest.mark.parametrize("name,value,message", WANDB_ENVIRONMENT, ids=[name for name, _, _ in WANDB_ENVIRONMENT])
def test_a_wandb_setting_wandb_refuses_is_one_line_exit_2_and_writes_nothing(name, value, message, monkeypatch,
                                                                             capsys, tmp_path):
    """Checked with the flags, before anything is written: wandb.init would refuse it only after the run folder."""
    monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as exit_info:
        main(QUICK[:2] + ["--num_epochs", "1", "--logger", "wandb"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {message}"), err
    assert not list(tmp_path.iterdir())


def test_entry_point_prints_no_traceback(tmp_path):
    result = run_cli(QUICK + ["--val_size=-0.1"], cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: --val_size must be in [0.0, 1.0), got -0.1"
    assert not list(Path(tmp_path).iterdir())


def test_the_flag_tables_are_the_config():
    """docs/flags.md holds every flag, README.md the common ones, as scripts/flag_table.py writes them."""
    import importlib.util

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("flag_table", root / "scripts" / "flag_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.flag_table() in (root / "docs" / "flags.md").read_text()
    assert module.flag_table(module.COMMON) in (root / "README.md").read_text()
    assert "| `num_epochs` | `25` | with a warmup_* schedule |" in module.flag_table()  # the resume rule's exception


def bound_cases() -> list:
    """(flag, value as typed, taken?) for every bound of every numeric flag, read off Config: at the bound (taken when
    closed, refused when open), one step outside (refused), and one step inside an open bound (taken). A step is 1 for
    an integer, the next float for a number."""

    def step(value, kind, direction):
        return value + direction if kind is int else math.nextafter(value, direction * math.inf)

    cases = []
    for name, field in FIELDS.items():
        check = field.metadata["check"]
        if not isinstance(check, Number):
            continue
        for bound, is_open, outward in ((check.low, check.low_open, -1), (check.high, check.high_open, 1)):
            if bound is None:
                continue
            bound = check.kind(bound)
            cases += [(name, bound, not is_open), (name, step(bound, check.kind, outward), False)]
            if is_open:
                cases.append((name, step(bound, check.kind, -outward), True))
    return cases


# what a value at a bound needs to pass the checks of flag combinations
BOUND_CONTEXT = {"momentum": ["--nesterov=False"], "num_epochs": ["--train=False", "--load_model_path", "w.pth"]}


@pytest.mark.parametrize("name,value,taken", bound_cases(), ids=[f"{n}={v!r}" for n, v, _ in bound_cases()])
def test_numeric_flag_bounds(name, value, taken):
    """--dropout 1 is refused and --dropout 0 taken, and so for every bound; a refusal is one line naming the flag."""
    argv = [f"--{name}", repr(value), *BOUND_CONTEXT.get(name, [])]
    if taken:
        assert getattr(parse_flags(argv), name) == value
        return
    with pytest.raises(UsageError) as refused:
        parse_flags(argv)
    message = str(refused.value)
    assert message.startswith(f"--{name} must be ") and message.endswith(f", got {value!r}") and "\n" not in message
