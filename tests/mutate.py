"""Mutation check: break one promised behaviour at a time and see which test notices.

    python tests/mutate.py [--list] [NAME ...]

Each mutation replaces an exact piece of source text in a temporary copy of the repository (the
working tree is never touched), runs the named test files there with `pytest -x`, and reports the
first test that failed, or SURVIVED when none did. A mutation whose text is not found exactly once
is an error: when the source changes, the list must change with it instead of silently passing.
"""
import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COPIED = ("tinyvit", "study", "reports", "tests", "experiments", "contract.py", "pyproject.toml")
MODEL, TRAIN, CONFIG = "tests/test_model.py", "tests/test_train.py", "tests/test_config.py"
EVIDENCE, REPEATS = "tests/test_evidence.py", "tests/test_repeats.py"
# the experiment-file checks of the trust suite, without its real studies and CLI runs
PLAN = ["tests/test_trust.py", "tests/test_spec.py", "-k",
        "not strange_name and not cluster and not data_that_cannot and not exploit and not "
        "resume and not dotted_set and not aliases and not cli and not dry_run"]

# name, file, exact old text, new text, tests to run
MUTATIONS = [
    ("flip-ignored", "tinyvit/train.py", "forward(batch.flip(3))", "forward(batch)", [TRAIN]),
    ("eval-flip-not-passed", "tinyvit/train.py",
     "tc.eval_batch_size, amp,\n                                     tc.eval_flip)",
     "tc.eval_batch_size, amp)", [TRAIN]),
    ("eval-loss-smoothed", "tinyvit/train.py", 'reduction="sum"',
     'reduction="sum", label_smoothing=0.1', [TRAIN]),
    ("cosine-flattened", "tinyvit/train.py",
     "floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))", "1.0", [TRAIN]),
    ("min-lr-ignored", "tinyvit/train.py", "tc.min_lr / tc.lr))", "0.0))", [TRAIN]),
    ("warmup-removed", "tinyvit/train.py", "round(tc.warmup_epochs * steps_per_epoch)", "0",
     [TRAIN]),
    ("label-smoothing-off", "tinyvit/train.py", ", label_smoothing=tc.label_smoothing)", ")",
     [TRAIN]),
    ("grad-clip-off", "tinyvit/train.py", "if tc.grad_clip:", "if False:", [TRAIN]),
    ("weight-decay-everywhere", "tinyvit/train.py", "p.ndim < 2 or n in", "False and n in",
     [TRAIN]),
    ("weight-decay-on-tables", "tinyvit/train.py", 'or n in ("pos_embed", "cls_token")', "",
     [TRAIN]),
    ("decay-groups-unused", "tinyvit/train.py",
     "AdamW(param_groups(model, tc.weight_decay), lr=tc.lr,",
     "AdamW(model.parameters(), weight_decay=tc.weight_decay, lr=tc.lr,", [TRAIN]),
    ("seed-ignored", "tinyvit/train.py", "torch.manual_seed(tc.seed)", "torch.seed()", [TRAIN]),
    ("test-every-epoch", "tinyvit/train.py", "if epoch == tc.epochs:", "if True:", [TRAIN]),
    ("resume-repeats-an-epoch", "tinyvit/train.py", 'start = resume["epoch"] + 1',
     'start = resume["epoch"]', [TRAIN]),
    ("resume-rng-not-restored", "tinyvit/train.py", 'torch.set_rng_state(resume["rng"]["cpu"])',
     "pass", [TRAIN]),
    ("resume-config-unchecked", "tinyvit/train.py", "load_checkpoint(args.checkpoint, cfg)",
     "load_checkpoint(args.checkpoint)", [TRAIN]),
    ("resume-model-keys-unchecked", "tinyvit/train.py",
     '(k.startswith("model.") or k in RESUME_KEYS)', "k in RESUME_KEYS", [TRAIN]),
    ("corrupt-checkpoint-traceback", "tinyvit/train.py",
     "except (pickle.UnpicklingError, EOFError, RuntimeError, OSError) as e:",
     "except OSError as e:", [TRAIN]),
    ("split-seed-ignored", "tinyvit/data.py", "manual_seed(cfg.split_seed)", "manual_seed(0)",
     [TRAIN]),
    ("sinusoidal-sin-cos-swapped", "tinyvit/model.py", "[angles.sin(), angles.cos()]",
     "[angles.cos(), angles.sin()]", [MODEL]),
    ("sinusoidal-base-changed", "tinyvit/model.py", "1.0 / 10000 **", "1.0 / 1000 **", [MODEL]),
    ("sinusoidal2d-zeros", "tinyvit/model.py",
     "torch.cat([torch.zeros(n_cls, dim), sincos_2d(self.grid, dim)])",
     "torch.zeros(n_cls + patches, dim)", [MODEL]),
    ("sinusoidal2d-axes-swapped", "tinyvit/model.py",
     "[sincos_1d(ys.flatten(), dim // 2), sincos_1d(xs.flatten(), dim // 2)]",
     "[sincos_1d(xs.flatten(), dim // 2), sincos_1d(ys.flatten(), dim // 2)]", [MODEL]),
    ("positions-not-added", "tinyvit/model.py",
     "return x if self.pos_embed is None else x + self.pos_embed", "return x", [MODEL]),
    ("rope-ladder-halved", "tinyvit/model.py", "/ quarter)", "/ (2 * quarter))", [MODEL]),
    ("rope-axes-swapped", "tinyvit/model.py",
     "[ys.flatten()[:, None] * freqs, xs.flatten()[:, None] * freqs]",
     "[xs.flatten()[:, None] * freqs, ys.flatten()[:, None] * freqs]", [MODEL]),
    ("drop-path-disabled", "tinyvit/model.py",
     "torch.linspace(0, cfg.drop_path, cfg.depth).tolist()", "[0.0] * cfg.depth", [MODEL]),
    ("drop-path-flat", "tinyvit/model.py",
     "torch.linspace(0, cfg.drop_path, cfg.depth).tolist()", "[cfg.drop_path] * cfg.depth",
     [MODEL]),
    ("drop-path-unscaled", "tinyvit/model.py", "x * keep / (1 - self.p)", "x * keep", [MODEL]),
    ("drop-path-in-eval", "tinyvit/model.py", "if not self.training or self.p == 0:",
     "if self.p == 0:", [MODEL]),
    ("attn-dropout-ignored", "tinyvit/model.py", "dropout_p=drop)", "dropout_p=0.0)", [MODEL]),
    ("attn-dropout-in-eval", "tinyvit/model.py",
     "self.attn_dropout if self.training else 0.0", "self.attn_dropout", [MODEL]),
    ("attention-maps-wrong-query", "tinyvit/model.py", "w[:, :, 0, 1:]", "w[:, :, 1, 1:]",
     [MODEL]),
    ("attention-maps-unscaled", "tinyvit/model.py", "/ math.sqrt(q.shape[-1])).softmax(-1)",
     ").softmax(-1)", [MODEL]),
    ("mean-pool-maps-over-keys", "tinyvit/model.py", "else w.mean(dim=2)", "else w.mean(dim=3)",
     [MODEL]),
    ("mean-pool-is-max", "tinyvit/model.py", "else x.mean(dim=1)", "else x.amax(dim=1)", [MODEL]),
    ("conv-stem-without-batchnorm", "tinyvit/model.py", "nn.BatchNorm2d(c_out), ", "", [MODEL]),
    ("min-lr-above-lr-accepted", "tinyvit/config.py", "self.min_lr < 0 or self.min_lr > self.lr",
     "self.min_lr < 0", [CONFIG]),
    ("nan-accepted", "tinyvit/config.py", "if not math.isfinite(number):", "if False:", PLAN),
    ("expression-admits-anything", "study/expr.py",
     "        else:\n            self._refuse(f\"'{ast.unparse(node)}'\")", "", PLAN),
    ("expression-compares-text-with-numbers", "study/expr.py",
     "if _kind(left) != _kind(other):", "if False:", PLAN),
    ("condition-ignored", "study/space.py", "if p.when and not p.when({**self.base, **values}):",
     "if False:", PLAN),
    ("condition-on-a-later-key-accepted", "study/space.py",
     "if named in space and named not in params:", "if False:", PLAN),
    ("repeated-seeds-accepted", "study/space.py", "if len(set(seeds)) != len(seeds):",
     "if False:", PLAN),
    ("repeated-levels-accepted", "study/space.py",
     "twice = [v for i, v in enumerate(coerced) if v in coerced[:i]]", "twice = []", PLAN),
    ("compared-keys-searchable", "study/spec.py", "for key in FIXED_KEYS:", "for key in ():",
     PLAN),
    ("grace-above-epochs-accepted", "study/spec.py",
     'if scheduler["grace_period"] > config.train.epochs:', "if False:", PLAN),
    ("nan-objective-ranked", "contract.py",
     'rows = rows[pd.to_numeric(rows[OBJECTIVE], errors="coerce")', "rows = rows[rows.index.notna()",
     PLAN),
    # what a study may claim (budget ladders, seeds, rungs) and search.repeats
    ("ladder-sign-flip-holds", "reports/analysis.py", "if len(signs) > 1:", "if False:",
     [EVIDENCE, "-k", "flips"]),
    ("ladder-budgets-mixed", "reports/study_report.py",
     "runs = analysis.at_budget(all_runs, ladder[-1]) if len(ladder) > 1 else all_runs",
     "runs = all_runs", [EVIDENCE, "-k", "longest_budget"]),
    ("rung-warning-silenced", "reports/analysis.py",
     'if row["rho"] < 0.5 or not row["rho_low"] > 0:', "if False:", [EVIDENCE, "-k", "rung"]),
    ("lucky-seed-wins", "contract.py", 'sort_values(["config_val_acc", OBJECTIVE]',
     'sort_values([OBJECTIVE, "config_val_acc"]', [REPEATS, "-k", "luckiest"]),
    ("failed-seed-averaged-out", "study/tuner.py",
     "scores = np.array(group.scores(), dtype=float)",
     "scores = np.array([v for v in group.scores() if v == v], dtype=float)",
     [REPEATS, "-k", "restore"]),
    ("seed-groups-not-restored", "study/tuner.py", "        self.set_state(state)", "        pass",
     [REPEATS, "-k", "restore"]),
    ("seq-pool-unweighted", "tinyvit/model.py",
     "return (self.score(x).softmax(dim=1) * x).sum(dim=1)", "return x.mean(dim=1)", [MODEL]),
]


def first_failure(output: str) -> str | None:
    found = re.search(r"^(?:FAILED|ERROR) (\S+)", output, re.MULTILINE)
    return found.group(1) if found else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("names", nargs="*", help="mutations to run (default: all)")
    ap.add_argument("--list", action="store_true", help="list the mutations and exit")
    args = ap.parse_args()
    chosen = [m for m in MUTATIONS if not args.names or m[0] in args.names]
    unknown = set(args.names) - {m[0] for m in MUTATIONS}
    if unknown:
        print(f"error: unknown mutation {sorted(unknown)[0]} (see --list)", file=sys.stderr)
        return 2
    for name, file, old, *_ in MUTATIONS:  # all of them, so a stale one is found on any run
        count = (REPO / file).read_text().count(old)
        if count != 1:
            print(f"error: mutation {name}: its text occurs {count} times in {file}, "
                  "expected once", file=sys.stderr)
            return 2
    if args.list:
        for name, file, old, new, tests in chosen:
            print(f"{name:30} {file:18} {' '.join(tests)}")
        return 0

    with tempfile.TemporaryDirectory(prefix="mutate-") as tmp:
        copy = Path(tmp)
        for item in COPIED:
            src = REPO / item
            if src.is_dir():
                shutil.copytree(src, copy / item, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy2(src, copy / item)
        print(f"{'mutation':30} {'file':18} {'seconds':>7}  killed by")
        survived = 0
        for name, file, old, new, tests in chosen:
            path = copy / file
            original = path.read_text()
            path.write_text(original.replace(old, new))
            t0 = time.perf_counter()
            # cwd is the copy: its tinyvit shadows the installed one, here and in CLI subprocesses
            r = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p",
                                "no:cacheprovider", *tests], cwd=copy, capture_output=True,
                               text=True)
            path.write_text(original)
            killer = first_failure(r.stdout) if r.returncode else None
            if r.returncode and killer is None:
                killer = f"pytest exit {r.returncode}"
            survived += killer is None
            print(f"{name:30} {file:18} {time.perf_counter() - t0:7.0f}  {killer or 'SURVIVED'}",
                  flush=True)
    print(f"{len(chosen) - survived} of {len(chosen)} mutations killed")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
