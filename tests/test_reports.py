"""A run's report says what its method did (issue 22): each method's summary words, the progress line's label,
and plots with units, marks and legends where they cover nothing; from synthetic histories, without Ray."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest
from matplotlib.figure import Figure

from tangle_ray.models import load_space
from tangle_ray.report import plots
from tangle_ray.report.leaderboard import TrialRecord, write_report
from tangle_ray.report.runs import against_random_verdict, timeline_text, write_run_report
from tangle_ray.scaling.config import peak_of
from tangle_ray.tasks import get_task
from tangle_ray.train.config import RunPlan, load_config
from tangle_ray.train.history import RunHistory
from tangle_ray.train.progress import PROGRESS_FILE, Progress
from tangle_ray.train.runner import TrainResult

STEPS = [2, 4, 6, 8]


@pytest.fixture
def figures(monkeypatch) -> dict[str, Figure]:
    """Every figure the report writes, by file name (still open for inspection)."""
    seen: dict[str, Figure] = {}
    save = plots.save

    def keep(fig: Figure, path, dpi: int = 120) -> Path:
        seen[Path(path).name] = fig
        return save(fig, path, dpi)

    monkeypatch.setattr(plots, "save", keep)
    return seen


def _history(space, archs, task, alphas: bool) -> RunHistory:
    rng = random.Random(0)
    metrics = [{"step": s, "train_loss": 3.0 - 0.1 * s, f"{task.unit}_per_s": 1000.0,
                **({"arch_loss": 3.1 - 0.1 * s, "arch_entropy": 1.0 - 0.01 * s} if alphas else {})} for s in STEPS]
    anytime = [{"step": s, **{f"valid_{m.key}": rng.uniform(0.1, 0.9) for m in task.metrics}, "arch": a}
               for s, a in zip(STEPS, archs)]
    rows = []
    for s in [0, *STEPS]:
        row = {"step": s}
        for d in space.dims.values():
            probs = [[1 / len(d.values)] * len(d.values)]
            row[d.name] = probs * space.max_layers if d.per_layer else probs[0]
        rows.append(row)
    return RunHistory(metrics=metrics, anytime=anytime, alphas=rows if alphas else [])


def _summary(tmp_path, method: str, *settings: str, space_name: str = "gpt-nano", **scores) -> tuple[str, RunPlan]:
    """The summary.md of a synthetic run; ``scores``: ``test_scores`` and ``against_random`` as the runner hands
    them over."""
    space = load_space(space_name)
    task = get_task(space.family.task)
    rng = random.Random(1)
    archs = [space.sample(rng) for _ in STEPS]
    archs[-1] = {**archs[-1], space.depth_dim: min(space.dims[space.depth_dim].values)}  # chosen: the least depth
    fixed = method == "fixed"
    cfg = load_config(None, [f"method={method}", f"space={space_name}", "eval_samples=16",
                             *([f"arch={archs[0]}".replace("'", "")] if fixed else []), *settings])
    if fixed:
        archs = [cfg.arch] * len(STEPS)
    elif method == "spos":
        archs = [space.largest()] * len(STEPS)
    plan = RunPlan(cfg, space, task, cfg.arch, cfg.identity())
    chosen = None if method == "spos" else archs[-1]
    history = _history(space, archs, task, alphas=method == "tanglenas")
    write_run_report(tmp_path, plan, history, chosen, tmp_path / "export", **scores)
    return (tmp_path / "summary.md").read_text(), plan


def test_tanglenas_summary_speaks_of_its_argmax_superposition_and_export(tmp_path):
    text, _ = _summary(tmp_path, "tanglenas")
    assert "argmax architecture" in text and "the superposition trains the mixture" in text
    assert "The argmax changed 3 time(s)" in text
    assert "weight split, superposed" in text
    assert "Consolidated supernet (`supernet/`" in text and "extracted as a standalone model (`model/`" in text


def test_spos_summary_has_no_argmax_superposition_or_model(tmp_path):
    text, _ = _summary(tmp_path, "spos")
    for words in ("argmax", "superposition", "superposed", "extracted model", "Consolidated supernet and"):
        assert words not in text, words
    assert "largest architecture" in text and "chooses no architecture" in text
    assert "one uniformly sampled single path per micro-batch" in text
    assert "SPOS chooses no architecture, so there is no `model/`" in text


@pytest.mark.parametrize("init, words, absent", [
    ("scratch", ["trained from scratch (fresh weights)", "trained from scratch; current weights"],
     ["inherit", "fine-tuned"]),
    ("inherit", ["fine-tuned: it started from the weights it inherits from the supernet `/somewhere/supernet`",
                 "its weights inherited from the supernet, fine-tuned"], ["from scratch"]),
])
def test_fixed_summary_says_how_it_started_and_has_no_supernet(tmp_path, init, words, absent):
    settings = ["init=inherit", "init_from=/somewhere/supernet"] if init == "inherit" else []
    text, _ = _summary(tmp_path, "fixed", *settings)
    for w in ("argmax", "superposition", "superposed", "Consolidated supernet"):
        assert w not in text, w
    assert "weight split, the fixed architecture" in text
    assert "The trained model (`model/`" in text and "a fixed architecture has no supernet" in text
    for w in words:
        assert w in text, w
    for w in absent:
        assert w not in text, w


def test_the_progress_line_says_argmax_only_where_architecture_weights_choose_and_mfu_on_gpus(tmp_path):
    space = load_space("gpt-nano")
    arch = space.largest()
    progress = Progress(tmp_path, 0, space, "tokens", 10)
    row = {"step": 1, "train_loss": 3.0, "tokens_per_s": 100.0, "arch_params": space.param_count(arch)}
    progress.record(row, arch, 60.0)  # a fixed architecture
    progress.record({**row, "step": 2, "arch_entropy": 0.9}, arch, 60.0)  # a search's current argmax
    progress.record({**row, "step": 3, "mfu": 0.4234}, arch, 60.0)  # on a GPU of the peak table
    fixed, searched, on_gpu = (tmp_path / PROGRESS_FILE).read_text().splitlines()
    assert "  arch n_layer=4" in fixed and "argmax" not in fixed and "MFU" not in fixed
    assert "  argmax n_layer=4" in searched
    assert "100 tokens/s  MFU 42.3%  arch" in on_gpu
    assert [peak_of(n) for n in ("NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB", "NVIDIA L4", "NVIDIA L40S",
                                 "cpu")] == [989e12, 312e12, 121e12, None, None]


def _fits(fig: Figure, *artists) -> bool:
    """Whether every artist is drawn inside the figure."""
    renderer = fig.canvas.get_renderer()
    box = fig.bbox
    for a in artists:
        e = a.get_window_extent(renderer)
        if e.x0 < box.x0 - 1 or e.y0 < box.y0 - 1 or e.x1 > box.x1 + 1 or e.y1 > box.y1 + 1:
            return False
    return True


def test_run_plots_have_units_change_marks_one_legend_and_marked_layers(tmp_path, figures):
    _summary(tmp_path, "tanglenas")
    fig = figures["anytime.png"]
    ax = fig.axes[0]
    assert ax.get_ylabel().replace("\n", " ") == "validation loss (cross-entropy, nats per token)"
    assert ax.get_xlabel() == "training step"
    marks = [line for line in ax.get_lines() if line.get_linestyle() == ":"]
    assert len(marks) == 3  # the argmax changed at steps 4, 6 and 8
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["score", "argmax architecture changed"]
    trajectory = figures["alphas_mlp_ratio.png"]
    assert len(trajectory.legends) == 1 and all(a.get_legend() is None for a in trajectory.axes)
    beyond = [a.get_title() for a in trajectory.axes if "beyond depth" in a.get_title()]
    assert beyond == ["layer 3 (beyond depth)", "layer 4 (beyond depth)"]  # the chosen depth is 2
    assert trajectory.axes[0].get_ylabel() == "probability (softmax of alpha)"


def test_vision_anytime_plot_in_percent_with_its_label_inside(tmp_path, figures):
    _summary(tmp_path, "tanglenas", "data.dir=x", space_name="vit-digits")
    fig = figures["anytime.png"]
    ax = fig.axes[0]
    assert ax.get_ylabel().replace("\n", " ") == "validation top-1 accuracy (%)"
    values = ax.get_lines()[0].get_ydata()
    assert all(10 <= v <= 90 for v in values)  # percent, not a fraction
    fig.canvas.draw()
    assert _fits(fig, ax.yaxis.label, ax.title)


def test_search_plots_have_units_m_parameters_and_legends_off_the_points(tmp_path, figures):
    space, task = load_space("gpt-nano"), get_task("lm")
    rng = random.Random(0)
    records = []
    for i in range(20):
        arch = space.sample(rng)
        records.append(TrialRecord(i, arch, {"loss": rng.uniform(5, 7), "perplexity": 300.0},
                                   space.param_count(arch), space.flops(arch), 1024))
    write_report(records, tmp_path, task, space, "valid")
    for name in ("incumbent.png", "pareto.png"):
        fig = figures[name]
        ax = fig.axes[0]
        fig.canvas.draw()
        assert ax.get_ylabel().replace("\n", " ") == "loss (cross-entropy, nats per token)"
        assert "'valid' split" in ax.get_title()
        assert ax.get_legend() is None and len(fig.legends) == 1  # below the axes, not over the points
        legend, frame = fig.legends[0].get_window_extent(), ax.get_window_extent()
        assert legend.y1 <= frame.y0 and _fits(fig, ax.yaxis.label, fig.legends[0])
    pareto = figures["pareto.png"].axes[0]
    assert pareto.xaxis.get_offset_text().get_text() == ""  # no "1e6"
    ticks = [t.get_text() for t in pareto.get_xticklabels() if t.get_text()]
    assert ticks and all(t.endswith("M") for t in ticks), ticks


AGAINST_RANDOM = {"samples": 64, "chosen": 0.902, "random": [0.5, 0.75, 0.8125, 0.25], "beaten": 4,
                  "against_median": {"estimate": 0.1245, "low": 0.05, "high": 0.2, "level": 0.95,
                                     "verdict": "better", "test": "paired bootstrap over 8 batches"}}


def test_summary_shows_accuracy_in_percent_as_the_plots_do_and_losses_unchanged(tmp_path):
    scores = {"top1": 0.902, "top5": 0.99375, "loss": 0.31204, "samples": 500}
    text, _ = _summary(tmp_path, "tanglenas", "data.dir=x", space_name="vit-digits", test_scores=scores,
                       against_random={**AGAINST_RANDOM, "metric": "top1"})
    assert "top-1 accuracy 90.2%, top-5 accuracy 99.4%, loss 0.3120 (`test_scores.json`)" in text
    assert ("scores top-1 accuracy 90.2% and beats 4 of 4 random architectures of the space (theirs: best 81.2%, "
            "median 50.0%, worst 25.0%") in text
    assert "difference +12.4 percentage points (positive = better), 95% interval [+5.0, +20.0]" in text
    rows = [line for line in text.splitlines() if line.startswith("| 2 |")]
    assert len(rows) == 1 and rows[0].split(" | ")[1].endswith("%"), rows  # the any-time table
    assert not re.search(r"(accuracy|best|median|worst) 0\.\d", text), "an accuracy as a fraction"


def test_language_model_summary_keeps_losses_and_perplexity_as_they_were(tmp_path):
    scores = {"loss": 2.71828, "perplexity": 15.1543, "samples": 256}
    text, _ = _summary(tmp_path, "tanglenas", test_scores=scores, against_random={**AGAINST_RANDOM, "metric": "loss",
                                                                                   "chosen": 2.5})
    assert "loss 2.7183, perplexity 15.15 (`test_scores.json`)" in text and "%," not in text
    assert "scores loss 2.5000 and beats" in text and "difference +0.1245 (positive = better)" in text


def test_a_retrain_prints_its_test_scores_once(tmp_path, capsys):
    """`tangle-ray retrain` ends with the run's lines; its test scores among them once (they were printed twice,
    as JSON and as text)."""
    from tangle_ray.cli import _print_result

    _, plan = _summary(tmp_path, "fixed", "data.dir=x", space_name="vit-digits")
    scores = {"split": "test", "top1": 0.875, "top5": 1.0, "loss": 0.4, "samples": 64, "params": 1000,
              "ms_per_sample": 1.5}
    _print_result(TrainResult(tmp_path, tmp_path, plan.arch, {}, tmp_path / "export", 1.0, scores, None,
                              plan.space.active(plan.arch), plan))
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if "test" in line.split(":")[0]] == [out.splitlines()[-1]], out
    assert out.count("87.5%") == 1 and "ms_per_sample" not in out, out
    assert (f"test:       top-1 accuracy 87.5%, top-5 accuracy 100.0%, loss 0.4000 on 64 held-out test samples "
            f"({tmp_path / 'test_scores.json'})") in out


def test_the_verdict_line_of_a_language_model_is_unchanged():
    verdict = against_random_verdict({**AGAINST_RANDOM, "metric": "loss"})
    assert verdict == ("better than the random architectures' median loss: difference +0.1245 (positive = better), "
                       "95% interval [+0.0500, +0.2000] (paired bootstrap over 8 batches)")


def test_the_wall_time_of_fit_is_split_into_its_parts():
    history = RunHistory(metrics=[{"step": 4, "elapsed_s": 10.0}], startups=[
        {"step": 0, "process_at": 1.0, "entered_at": 2.0, "ready_at": 3.0, "imports_s": 1.0},  # a failed attempt
        {"step": 2, "process_at": 95.0, "entered_at": 100.0, "ready_at": 104.0, "imports_s": 1.0, "data_s": 3.0}])
    timeline = history.timeline(90.0, 120.0)
    assert timeline == {"fit_s": 30.0, "start_s": 10.0, "process_s": 5.0, "imports_s": 1.0, "data_s": 3.0,
                        "loop_s": 10.0, "end_s": 6.0}
    assert timeline_text(timeline) == (
        "fit() 30.0 s = Ray Train starting the workers 10.0 s (in their processes 5.0) + set-up 4.0 s (imports 1.0, "
        "data 3.0) + training loop 10.0 s + last evaluation, checkpoint and stop 6.0 s")
    assert RunHistory().timeline(0.0, 1.0) == {}  # a checkpoint written before start-ups were recorded
