"""Proves that tests guard what they claim (STYLE.md, point 16): breaks one core line at a time in a scratch copy of
HEAD and runs the tests that should notice.

    python scripts/mutation_check.py                              # every mutation (slow: not in CI)
    python scripts/mutation_check.py --only label_smoothing,ema   # some, by label
    python scripts/mutation_check.py --list                       # the labels, and whether each line is still there

A mutation is (label, file, the exact original text, its replacement, the tests that must fail). Every named test must
first pass on the unbroken copy; then each mutation is applied alone and its tests run. "caught": a named test fails;
"SURVIVED": all pass. An original text found other than once is an error, so that the list is corrected when code
moves. The copy is of HEAD: commit a new test before proving it here. Exit status 0 when every mutation run is caught.
"""

import argparse
import io
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 1800  # seconds for one pytest run; the slowest tests named here launch several training runs


@dataclass(frozen=True)
class Mutation:
    label: str
    path: str
    original: str
    replacement: str
    tests: tuple


def row(flag: str) -> str:
    return f"tests/test_learned_flags.py::test_flag_does_what_its_help_line_says[{flag}]"


BOUNDS = "tests/test_flags.py::test_numeric_flag_bounds"
TRAINING, ENGINE, LOADERS, DATA = (f"alexnet_dist/{name}.py" for name in ("training", "engine", "loaders", "data"))
AUGMENTATION = "cfg.random_crop, cfg.mean, cfg.std, accelerator.device"  # one line in training.py, three flags
COLUMNS, SHARDED = "alexnet_dist/columns.py", "alexnet_dist/sharded.py"
LAYOUTS_MATCH = "tests/test_layouts.py::test_split_layouts_learn_what_one_process_learns_and_count_each_image_once"
COLUMNS_MATCH, HYBRID_MATCH = f"{LAYOUTS_MATCH}[columns-2]", f"{LAYOUTS_MATCH}[hybrid-2]"
PLAN = "cfg.resize, cfg.random_crop, cfg.flip, cfg.seed,"  # the epoch plan's flags, in loaders.py
HYBRID = "alexnet_dist/hybrid.py"
HYBRID_PARTS = ("tests/test_hybrid.py::test_the_parts_compute_the_whole_network_and_drop_the_same_features_of_"
                "fc1s_input")
FC2_PARTIAL = "sum_scatter(nn.functional.linear(x, head.fc2.weight), group)"  # fc2's partial sums, in hybrid.py

MUTATIONS = [
    # issue 32's four, which no test caught
    Mutation("label_smoothing", TRAINING, "CrossEntropyLoss(label_smoothing=cfg.label_smoothing)",
             "CrossEntropyLoss()", (row("label_smoothing"),)),
    Mutation("ema", TRAINING, "t.average.update_parameters(model)", "pass", (row("ema"),)),
    Mutation("warmup_epochs", ENGINE, "round(cfg.warmup_epochs * steps_per_epoch)",
             "round((cfg.warmup_epochs + 1) * steps_per_epoch)", (row("warmup_epochs"),)),
    Mutation("open_bounds", "alexnet_dist/config.py", "number >= high if high_open", "number > high if high_open",
             (BOUNDS,)),
    # the audit's eight that were caught (slow: launches)
    # the kill-point resume runs the warm-up schedule, whose state sets the learning rate (the plateau schedule of
    # the bit-identical test cannot reduce it within its 2 epochs)
    Mutation("scheduler_checkpointed", "alexnet_dist/run.py", "register_for_checkpointing(trainer.scheduler, ",
             "register_for_checkpointing(",
             ("tests/test_resume.py::test_resume_is_bit_identical_on_one_process_and_the_wandb_run_keeps_its_id",
              "tests/test_resume.py::test_kills_at_set_points_always_resume_from_a_valid_checkpoint")),
    Mutation("evaluation_summed", ENGINE, 'confusions = accelerator.reduce(confusions, reduction="sum").view(',
             "confusions = confusions.view(",
             ("tests/test_launch.py::test_cifar10_is_downloaded_once_by_the_main_process_while_the_other_rank_waits",)),
    Mutation("accumulation", "alexnet_dist/runtime.py", "gradient_accumulation_steps=cfg.grad_accum_steps,", "",
             ("tests/test_multinode.py::test_resume_with_other_processes_or_accumulation_keeps_the_training"
              "[accumulated]",)),
    Mutation("micro_batch", "alexnet_dist/runtime.py", "shares = replicas * grad_accum_steps",
             "shares = replicas",
             ("tests/test_flags.py::test_bad_input_is_one_line_exit_2_and_writes_nothing[--batch_size 30 "
              "--grad_accum_steps 4]",)),
    Mutation("retention", "alexnet_dist/checkpoint.py", "for path in saved[: -self.keep]:",
             "for path in saved[: -self.keep - 1]:",
             ("tests/test_checkpoints.py::test_the_newest_checkpoints_and_the_best_are_kept_and_nothing_else",)),
    Mutation("data_order_shared", LOADERS, PLAN, PLAN.replace("cfg.seed,", "cfg.seed + rank,"),
             ("tests/test_data.py::test_ranks_and_micro_steps_share_each_epoch_without_overlap",)),
    # the bit-identical test resumes at an epoch's end, where step_in_epoch is 0 either way; the kill test mid-epoch
    Mutation("resume_mid_epoch", "alexnet_dist/run.py",
             "self.step_in_epoch = self.start_step if epoch == self.start_epoch else 0", "self.step_in_epoch = 0",
             ("tests/test_resume.py::test_resume_is_bit_identical_on_one_process_and_the_wandb_run_keeps_its_id",
              "tests/test_resume.py::test_kills_at_set_points_always_resume_from_a_valid_checkpoint")),
    Mutation("dropout_per_rank", TRAINING, "cfg.seed * 65_536 + accelerator.process_index + 1",
             "cfg.seed * 65_536 + 1",
             ("tests/test_train.py::test_ranks_draw_their_own_dropout_masks_over_the_same_data_plan_and_end_with_"
              "identical_weights",)),
    # a flag replaced by its default (or another constant), for each row of tests/test_learned_flags.py
    Mutation("lr", ENGINE, "lr=cfg.lr,", "lr=0.05,", (row("lr"),)),
    Mutation("momentum", ENGINE, "momentum=cfg.momentum,", "momentum=0.9,", (row("momentum"),)),
    Mutation("weight_decay", ENGINE, "weight_decay=cfg.weight_decay,", "weight_decay=5e-4,", (row("weight_decay"),)),
    Mutation("nesterov", ENGINE, "nesterov=cfg.nesterov,", "nesterov=True,", (row("nesterov"),)),
    Mutation("schedule", ENGINE, "lr_factor(cfg.schedule, step, warmup, total)",
             'lr_factor("warmup_linear", step, warmup, total)', (row("schedule"),)),
    Mutation("plateau_patience", ENGINE, "patience=cfg.plateau_patience", "patience=2", (row("plateau_patience"),)),
    Mutation("dropout", TRAINING, "dropout=cfg.dropout,", "dropout=0.5,", (row("dropout"),)),
    Mutation("first_linear_once", TRAINING, "first_linear_once=cfg.first_linear_once,", "first_linear_once=False,",
             (row("first_linear_once"),)),
    Mutation("first_linear_scaled", ENGINE, "pooled_copies(cfg.random_crop) if cfg.first_linear_scaled else 1",
             "1", (row("first_linear_scaled"),)),
    Mutation("conv1_from_data", TRAINING, "if cfg.conv1_from_data and weights is None", "if False",
             (row("conv1_from_data"),)),
    Mutation("lrn_alpha", TRAINING, "lrn_alpha=cfg.lrn_alpha)", "lrn_alpha=1e-4)", (row("lrn_alpha"),)),
    # evaluation and predictions build the network the weights file was trained with (it had used the flag's default)
    Mutation("weights_lrn_alpha", "alexnet_dist/preflight.py",
             'settings["lrn_alpha"] = trained.get("lrn_alpha", Config.lrn_alpha)', "pass",
             ("tests/test_tracking.py::test_evaluation_and_predictions_use_the_preprocessing_the_weights_were_"
              "trained_with",)),
    # the column split: a layer reading the other column's maps first; the logits' bias added by both columns
    Mutation("columns_exchange", COLUMNS, "torch.cat(gather_batch(part, group).chunk(COLUMNS), dim=1)",
             "torch.cat(gather_batch(part, group).chunk(COLUMNS)[::-1], dim=1)", (COLUMNS_MATCH,)),
    Mutation("columns_logits_bias", SHARDED, "parameter.requires_grad_(False)", "parameter.requires_grad_(True)",
             (COLUMNS_MATCH,)),
    # the average's file saved as this column's share, not the whole network
    Mutation("columns_average_whole", "alexnet_dist/run.py",
             "self.trainer.layout.whole_model(self.trainer.average.module)", "self.trainer.average.module",
             (COLUMNS_MATCH,)),
    # the hybrid's exchange: the cut layers' gradients not divided by N (they sum every process's loss); fc2's
    # partial sums not added over the processes; fc2's bias added by every process before the sum; DDP averaging the
    # cut layers' different slices. Both split layouts (sharded.py): fc1's input dropped by each process from its own
    # stream (its own mask on every part), folded or not; the pooled values sent instead of conv5's maps (36 times
    # the bytes); the columns' masks drawn per image instead of per column
    Mutation("hybrid_gradient_scale", HYBRID, "lambda gradient: gradient / shards.count", "lambda gradient: gradient",
             (HYBRID_PARTS, HYBRID_MATCH)),
    Mutation("hybrid_reduce_scatter", HYBRID, FC2_PARTIAL,
             "nn.functional.linear(x, head.fc2.weight).chunk(self.shards.count)[self.shards.index]",
             (HYBRID_PARTS, HYBRID_MATCH)),
    Mutation("hybrid_bias_once", HYBRID, FC2_PARTIAL, FC2_PARTIAL.replace("head.fc2.weight)", "head.fc2.weight, "
                                                                                             "head.fc2.bias)"),
             (HYBRID_PARTS,)),
    Mutation("split_dropout_owner", SHARDED, "bernoulli_(keep, generator=torch.Generator(x.device).manual_seed(seed))",
             "bernoulli_(keep)", (HYBRID_PARTS,)),
    Mutation("split_folded_dropout_owner", SHARDED, "self.join(dropout(torch.flatten(maps, 1)))",
             "dropout(self.join(torch.flatten(maps, 1)))", (HYBRID_PARTS,)),
    Mutation("split_exchanges_maps", SHARDED, "maps if maps.shape[-2] * maps.shape[-1] <= 36 else self.avgpool(maps)",
             "self.avgpool(maps)", (HYBRID_PARTS,)),
    Mutation("columns_mask_halves", COLUMNS, "joins = 1  # the columns' channels", "joins = 0  # the columns' images",
             (HYBRID_PARTS,)),
    Mutation("hybrid_ddp_whole_only", HYBRID, "return part, mesh.get_group(), list(CUT)",
             "return part, mesh.get_group(), []", (HYBRID_PARTS,)),
    Mutation("groups", TRAINING, "groups=cfg.groups,", "groups=1,", (row("groups"),)),
    Mutation("init", TRAINING, "init=cfg.init,", 'init="kaiming",', (row("init"),)),
    Mutation("seed_weights", TRAINING, "set_seed(cfg.seed)", "set_seed(0)", (row("seed"),)),
    Mutation("seed_split", DATA, "split(full, cfg.val_size, cfg.fraction_of_data, cfg.seed)",
             "split(full, cfg.val_size, cfg.fraction_of_data, 0)", (row("seed"),)),
    Mutation("val_size", DATA, "num_val = round(val_size * count)", "num_val = round(0.1 * count)",
             (row("val_size"),)),
    Mutation("fraction_of_data", DATA, "train = train[: round(fraction * len(train))]", "train = train[:]",
             (row("fraction_of_data"),)),
    Mutation("dataset", DATA, 'elif cfg.dataset == "cifar10":', 'elif cfg.dataset in ("cifar10", "folder"):',
             (row("dataset"),)),
    Mutation("data_dir", DATA, "root = Path(cfg.data_dir)", 'root = Path("data")', (row("data_dir"),)),
    Mutation("batch_size", LOADERS, "batch_size=cfg.batch_size, micro_batch", "batch_size=256, micro_batch",
             (row("batch_size"),)),
    Mutation("resize", LOADERS, "device=device, resize=cfg.resize,", "device=device, resize=(70, 70),",
             (row("resize"),)),
    Mutation("random_crop", TRAINING, AUGMENTATION, AUGMENTATION.replace("cfg.random_crop", "(64, 64)"),
             (row("random_crop"),)),
    Mutation("mean", TRAINING, AUGMENTATION, AUGMENTATION.replace("cfg.mean", "(0.5, 0.5, 0.5)"), (row("mean"),)),
    Mutation("std", TRAINING, AUGMENTATION, AUGMENTATION.replace("cfg.std", "(0.5, 0.5, 0.5)"), (row("std"),)),
    Mutation("flip", LOADERS, PLAN, PLAN.replace("cfg.flip", "True"), (row("flip"),)),
    Mutation("flip_alternate", "alexnet_dist/transforms.py", "coins = own[order] ^ bool(epoch % 2)",
             "coins = own[order]", (row("flip"),)),
    Mutation("translate", LOADERS, "translate=cfg.translate", "translate=8", (row("translate"),)),
    Mutation("pca_color", LOADERS, "colour_std=cfg.pca_color", "colour_std=0.0", (row("pca_color"),)),
    Mutation("cutout", TRAINING, "basis, cfg.cutout, channels_last", "basis, 0, channels_last", (row("cutout"),)),
    Mutation("tta", TRAINING, "(cfg.tta,))[cfg.tta]", '("ten",))["ten"]', (row("tta"),)),
]


def scratch_copy(folder: Path) -> str:
    """HEAD's files in `folder` (git archive); returns HEAD's short hash."""
    archive = subprocess.run(["git", "archive", "HEAD"], cwd=ROOT, capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.strip()


def occurrences(mutation: Mutation, text: str) -> str | None:
    """None when the original text is there once; else what is wrong."""
    count = text.count(mutation.original)
    return None if count == 1 else f"original text found {count} times in {mutation.path}: {mutation.original!r}"


def run_tests(copy: Path, tests) -> tuple:
    """(pytest's exit status, {test: outcome}, seconds) of `tests` run in the copy, importing the copy's package."""
    env = {**os.environ, "PYTHONPATH": str(copy)}
    command = [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", *tests]
    started = time.perf_counter()
    try:
        result = subprocess.run(command, cwd=copy, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        return None, {}, time.perf_counter() - started
    # -rA's summary: "PASSED tests/x.py::test[id]", "FAILED tests/x.py::test[id] - reason" (ids may hold spaces)
    outcomes = {}
    for line in result.stdout.splitlines():
        found = re.match(r"(PASSED|FAILED|ERROR) (.+?)(?: - .*)?$", line)
        if found:
            outcomes[found.group(2)] = found.group(1)
    return result.returncode, outcomes, time.perf_counter() - started


def named(test: str, outcomes: dict) -> list:
    """The outcomes of `test`: itself, or each of its parametrized cases when it names a whole test function."""
    return [outcome for name, outcome in outcomes.items() if name == test or name.startswith(test + "[")]


def check(mutation: Mutation, copy: Path) -> str:
    """One mutation applied alone in the copy, its tests run, the copy restored: the report's line."""
    path = copy / mutation.path
    text = path.read_text()
    path.write_text(text.replace(mutation.original, mutation.replacement))
    try:
        status, outcomes, seconds = run_tests(copy, mutation.tests)
    finally:
        path.write_text(text)
    if status is None:
        return f"ERROR     {mutation.label}: the tests ran past {TIMEOUT} s"
    if status not in (0, 1):
        return f"ERROR     {mutation.label}: pytest exited {status} (collection or usage error), {seconds:.0f} s"
    if status == 1:
        failed = sorted(name for name, outcome in outcomes.items() if outcome != "PASSED")
        return f"caught    {mutation.label} ({seconds:.0f} s) by {', '.join(failed)}"
    return f"SURVIVED  {mutation.label} ({seconds:.0f} s): {', '.join(mutation.tests)} passed"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="comma-separated labels of the mutations to run")
    parser.add_argument("--list", action="store_true", help="list the mutations and whether HEAD still has each line")
    args = parser.parse_args(argv)
    labels = [label for label in args.only.split(",") if label]
    unknown = sorted(set(labels) - {m.label for m in MUTATIONS})
    if unknown:
        parser.error(f"unknown mutation(s): {', '.join(unknown)} (--list names them)")
    chosen = [m for m in MUTATIONS if not labels or m.label in labels]
    with tempfile.TemporaryDirectory(prefix="mutation-check-") as folder:
        copy = Path(folder)
        head = scratch_copy(copy)
        problems = {m.label: occurrences(m, (copy / m.path).read_text()) for m in chosen}
        if args.list:
            for m in chosen:
                print(f"{m.label:24} {m.path:28} {problems[m.label] or 'line found'}; tests: {', '.join(m.tests)}")
            return 0
        print(f"mutation check of HEAD {head} in a scratch copy: {len(chosen)} mutation(s)", flush=True)
        tests = sorted({test for m in chosen for test in m.tests})
        status, outcomes, seconds = run_tests(copy, tests)
        unbroken = {test: named(test, outcomes) for test in tests}
        failing = sorted(test for test, seen in unbroken.items() if not seen or set(seen) != {"PASSED"})
        print(f"unbroken copy: {len(tests) - len(failing)} of {len(tests)} test(s) pass ({seconds:.0f} s)", flush=True)
        results = []
        for m in chosen:
            if problems[m.label]:
                line = f"ERROR     {m.label}: {problems[m.label]}"
            elif set(m.tests) & set(failing):
                line = f"ERROR     {m.label}: fails unbroken: {', '.join(sorted(set(m.tests) & set(failing)))}"
            else:
                line = check(m, copy)
            print(line, flush=True)
            results.append(line)
    caught = sum(line.startswith("caught") for line in results)
    print(f"caught {caught} of {len(results)}")
    return 0 if caught == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
