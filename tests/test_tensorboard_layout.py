"""TensorBoard opens on what matters (``rlad_pl.training.tb_layout``): the custom-scalars overview written by real CLI
runs matches the tags those runs log, ``hp_metric`` is the final ``val/all/mean@k`` (never Lightning's constant -1), and
the real TensorBoard server's custom-scalars plugin serves the layout and finds data for every chart."""

from __future__ import annotations

import re
import shutil
import sys
import urllib.parse
from pathlib import Path

import pytest

from conftest import CONFIGS, REPO, event_accumulators, run_cli, scalars

sys.path.insert(0, str(REPO / "tools"))

from rlad_pl.testing.runs import event_files, version_dirs  # noqa: E402
from rlad_pl.training.tb_layout import IGNORED_TAGS, flat_params, overview_layout  # noqa: E402

DEMO = str(CONFIGS / "demo.yaml")
#: the demo (chain_sum, 4 difficulty levels 2t1d..5t1d, ValidateAtStart) on a budget of a few seconds
SMALL_DEMO = ["--trainer.max_epochs", "2", "--trainer.check_val_every_n_epoch", "2", "--data.prompts_per_rollout",
              "8", "--data.group_size", "4", "--data.micro_batch_size", "32", "--data.val_prompts", "16",
              "--data.val_k", "2", "--data.pass_k", "[1, 2]", "--trainer.enable_checkpointing", "false"]
OBJECTIVES = {"TRRD": None, "GRPO": '[{"class_path": "rlad_pl.objectives.GRPO"}]'}


def _events(log_dir):
    return event_accumulators(log_dir)


def scalar_tags(log_dir) -> set[str]:
    return {t for ea in _events(log_dir) for t in ea.Tags()["scalars"]}


def written_layouts(log_dir):
    """Every custom-scalars layout in the run's event files, parsed back into ``layout_pb2.Layout``."""
    from tensorboard.plugins.custom_scalar import layout_pb2, metadata

    out = []
    for ea in _events(log_dir):
        if metadata.CONFIG_SUMMARY_TAG in ea.Tags()["tensors"]:
            for ev in ea.Tensors(metadata.CONFIG_SUMMARY_TAG):
                layout = layout_pb2.Layout()
                layout.ParseFromString(ev.tensor_proto.string_val[0])
                out.append(layout)
    return out


def session_hparams(log_dir) -> dict:
    """The hyperparameters of the run's HParams session (``session_start_info``), read from the raw events."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.hparams import plugin_data_pb2

    found = {}
    for f in event_files(log_dir):
        for ev in EventFileLoader(str(f)).Load():
            for v in ev.summary.value:
                if v.metadata.plugin_data.plugin_name == "hparams":
                    data = plugin_data_pb2.HParamsPluginData.FromString(v.metadata.plugin_data.content)
                    if data.HasField("session_start_info"):
                        for k, x in data.session_start_info.hparams.items():
                            found[k] = getattr(x, x.WhichOneof("kind"))
    return found


def chart_regexes(layout) -> dict[tuple[str, str], list[str]]:
    return {(c.title, ch.title): list(ch.multiline.tag) for c in layout.category for ch in c.chart}


# ------------------------------------------------------------------------------------------ pure functions
def test_overview_layout_keeps_matching_charts_and_files_the_rest_under_other():
    grpo = {"epoch", "hp_metric", "reward", "rollout/reward_mean", "rollout/accuracy", "grpo/loss", "train/loss",
            "grpo/clip_frac_low", "grpo/clip_frac_high", "val/all/mean@4", "val/2t1d/mean@4", "timing/generate",
            "renio/weight_mean", "renio/opd/teacher_logprob_mean"}
    layout = overview_layout(grpo)
    assert list(layout) == ["Overview", "Other"]
    assert list(layout["Overview"]) == ["reward and accuracy (rollouts)", "validation Mean@k per level",
                                        "clip and clamp fractions", "loss (total and per objective)",
                                        "time per phase (s)"]
    assert layout["Overview"]["clip and clamp fractions"] == ["Multiline", [r".+/clip_frac_low$",
                                                                            r".+/clip_frac_high$"]]
    assert layout["Other"] == {"renio": ["Multiline", [r"renio/opd/teacher_logprob_mean$", r"renio/weight_mean$"]]}
    # no teacher chart without a teacher tag; adding one brings it in, with only the matching regex
    trrd = overview_layout(grpo | {"trrd/teacher_log_ratio_mean", "trrd/teacher_clamp_frac"})
    assert trrd["Overview"]["teacher divergence (student - teacher log-prob, KL)"] == [
        "Multiline", [r".+/teacher_log_ratio_mean$"]]
    assert trrd["Overview"]["clip and clamp fractions"][1] == [r".+/clip_frac_low$", r".+/clip_frac_high$",
                                                               r".+/teacher_clamp_frac$"]
    assert overview_layout(IGNORED_TAGS) == {}


def test_flat_params_lists_by_index_and_drops_none():
    cfg = {"model": {"objectives": [{"class_path": "rlad_pl.objectives.TRRD", "init_args": {"alpha": 0.5}}],
                     "teacher": None, "dtype": "float32"}, "data": {"pass_k": [1, 8], "seed": 0}}
    assert flat_params(cfg) == {"model/objectives/0/class_path": "rlad_pl.objectives.TRRD",
                                "model/objectives/0/init_args/alpha": 0.5, "model/dtype": "float32",
                                "data/pass_k/0": 1, "data/pass_k/1": 8, "data/seed": 0}


# ------------------------------------------------------------------------------------------ real CLI runs
@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory):
    """``method -> log dir`` of small demo runs through the CLI, each run once per module on first use."""
    done: dict[str, str] = {}

    def get(method: str) -> str:
        if method not in done:
            root = tmp_path_factory.mktemp(f"tb_{method}")
            extra = ["--model.objectives", OBJECTIVES[method]] if OBJECTIVES[method] else []
            run_cli("fit", "--config", DEMO, *SMALL_DEMO, *extra, "--trainer.default_root_dir", str(root))
            (done[method],) = (str(p) for p in version_dirs(root))
        return done[method]

    return get


@pytest.fixture(params=list(OBJECTIVES))
def demo_run(request, demo_runs):
    return request.param, demo_runs(request.param)


def test_layout_matches_the_logged_tags(demo_run):
    method, log_dir = demo_run
    tags = scalar_tags(log_dir)
    layouts = written_layouts(log_dir)  # after the first step; again when later tags (sync/*) change it
    assert 1 <= len(layouts) <= 2
    layout = layouts[-1]
    assert [c.title for c in layout.category][0] == "Overview"
    charts = chart_regexes(layout)
    # every regex finds at least one logged tag (TensorBoard matches at the start of the tag, like re.match) ...
    for (cat, title), regexes in charts.items():
        for rx in regexes:
            assert any(re.match(rx, t) for t in tags), f"{cat} / {title}: {rx!r} matches no logged tag"
    # ... and every logged tag (Lightning's bookkeeping aside) is on some chart
    uncovered = [t for t in tags - IGNORED_TAGS if not any(re.match(rx, t) for rxs in charts.values() for rx in rxs)]
    assert uncovered == []
    overview = {title: rxs for (cat, title), rxs in charts.items() if cat == "Overview"}
    levels = [t for t in tags if re.match(overview["validation Mean@k per level"][0], t)]
    assert sorted(levels) == ["val/2t1d/mean@2", "val/3t1d/mean@2", "val/4t1d/mean@2", "val/5t1d/mean@2",
                              "val/all/mean@2"]
    teacher = "teacher divergence (student - teacher log-prob, KL)"
    if method == "TRRD":
        assert overview[teacher] == [r".+/teacher_log_ratio_mean$"]
        assert overview["clip and clamp fractions"] == [r".+/clip_frac_low$", r".+/clip_frac_high$",
                                                        r".+/teacher_clamp_frac$"]
    else:
        assert teacher not in overview
        assert overview["clip and clamp fractions"] == [r".+/clip_frac_low$", r".+/clip_frac_high$"]
    assert {"reward and accuracy (rollouts)", "entropy (student tokens)", "grad norm (before clipping)",
            "time per phase (s)"} <= set(overview)


def test_hp_metric_is_the_final_validation_mean_at_k(demo_run):
    method, log_dir = demo_run
    val = scalars(log_dir, "val/all/mean@2")
    assert len(val) == 2  # ValidateAtStart (step 0) and the validation after epoch 2
    assert scalars(log_dir, "hp_metric") == [val[-1]]
    hp = session_hparams(log_dir)
    assert hp["model/objectives/0/class_path"] == f"rlad_pl.objectives.{method}"
    assert hp["data/val_k"] == 2 and hp["data/prompts_per_rollout"] == 8 and hp["trainer/max_epochs"] == 2
    assert hp["model/optimizer/init_args/lr"] == pytest.approx(3e-4)
    # hparams.yaml keeps the module's own init arguments (what load_from_checkpoint would read)
    assert "model/objectives/0/class_path" not in (Path(log_dir) / "hparams.yaml").read_text()


def test_tensorboard_plugin_serves_the_layout_and_data_for_every_chart(demo_runs):
    from render_tensorboard import get_json, tensorboard_server

    log_dir = demo_runs("TRRD")
    with tensorboard_server(Path(log_dir).parent) as url:
        layout = get_json(url + "/data/plugin/custom_scalars/layout")
        run = Path(log_dir).name
        last = written_layouts(log_dir)[-1]  # the plugin serves the most recent layout of the run
        assert [(c["title"], [ch["title"] for ch in c["chart"]]) for c in layout["category"]] == [
            (c.title, [ch.title for ch in c.chart]) for c in last.category]
        assert layout["category"][0]["title"] == "Overview"
        for category in layout["category"]:
            for chart in category["chart"]:
                for rx in chart["multiline"]["tag"]:
                    q = urllib.parse.urlencode({"run": run, "tag": rx})
                    res = get_json(f"{url}/data/plugin/custom_scalars/scalars?{q}")
                    assert res["regex_valid"] and res["tag_to_events"], (chart["title"], rx)


@pytest.mark.parametrize("no_val", [["--trainer.limit_val_batches", "0"], []],
                         ids=["val_disabled", "val_never_reached"])  # trrd_tiny validates every 10 epochs
def test_no_validation_means_no_hp_metric_and_no_validation_charts(tmp_path, no_val):
    run_cli("fit", "--config", str(CONFIGS / "trrd_tiny.yaml"), "--trainer.max_epochs", "1", *no_val,
            "--trainer.default_root_dir", str(tmp_path), "--export.enabled", "false",
            "--trainer.enable_checkpointing", "false")
    tags = scalar_tags(tmp_path)
    assert "hp_metric" not in tags and "rollout/reward_mean" in tags and not any(t.startswith("val/") for t in tags)
    layouts = written_layouts(tmp_path)
    val_charts = [any(rx.startswith("val/") for rxs in chart_regexes(lay).values() for rx in rxs) for lay in layouts]
    # enabled validation: its charts are there from the first step, and dropped at the end if it never ran
    assert val_charts == ([False] if no_val else [True, False])
    assert session_hparams(tmp_path) == {}


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs chromium (apt-get install -y chromium)")
def test_render_tool_screenshots_the_overview(demo_runs, tmp_path, capsys):
    pytest.importorskip("websockets")
    from render_tensorboard import main

    log_dir = demo_runs("TRRD")
    out = tmp_path / "tb.png"
    assert main([str(Path(log_dir).parent), str(out), "--height", "1000", "--timeout", "60"]) == 0
    png = out.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert (width, height) == (1600, 1000)
    printed = capsys.readouterr().out
    assert printed.splitlines()[0].startswith("Overview: reward and accuracy (rollouts) | validation Mean@k")
    drawn, cards = map(int, re.search(r"(\d+) of (\d+) chart cards drew data", printed).groups())
    assert drawn == cards > 0
