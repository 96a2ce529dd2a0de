"""`drmm experiment`: a Table 1 row end to end on a tiny schedule, the report (paper numbers beside ours, "not run"
for the rest), the convergence helper, the schedules, the throughput measurement."""

import csv
import dataclasses
import json
from pathlib import Path

import pytest

import drmm_kernels as dk

from drmm import paper as E
from drmm.config import TrainConfig, config_from_dict, read_yaml_mapping
from drmm.paper import rows, runner
from drmm.cli import main
from drmm_cases import DATA_DIR, needs_mnist

TINY = [
    "--set",
    "max_steps=3",
    "--set",
    "max_train_samples=300",
    "--set",
    "eval_samples=100",
    "--set",
    "eval_every_steps=2",
]


@needs_mnist
def test_table1_row_appends_a_well_formed_csv_row(tmp_path, capsys):
    out = tmp_path / "results"
    argv = [
        "experiment",
        "table1",
        "--row",
        "drmm2",
        "--labels",
        "100",
        "--seeds",
        "0,1",
        "--schedule",
        "smoke",
        "--test-images",
        "200",
        "--out",
        str(out),
        "--data-dir",
        DATA_DIR,
        *TINY,
    ]
    assert main(argv) == 0
    with open(out / "table1.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["seed"] for r in rows] == ["0", "1"] and list(rows[0]) == E.CSV_FIELDS
    for r in rows:
        assert r["row"] == "drmm2" and r["labels"] == "100" and r["steps"] == "3" and r["test_images"] == "200"
        assert 0 <= float(r["test_error"]) <= 100 and float(r["wall_s"]) >= 0
        assert r["schedule"].startswith("smoke-3steps") and "max_steps=3" in r["schedule"]
        assert r["device"].startswith("cpu") and len(r["config_hash"]) == 12 and r["commit"]
        assert r["checkpoint"] == "last" and r["val_samples"] == "0"
        assert r["final_val_error"] == r["best_val_error"] == "" and r["objective"] == "CE+RC+KLent+KLmarg"
        assert (out / r["run_dir"] / "metrics.csv").exists()
    assert rows[0]["config_hash"] != rows[1]["config_hash"]  # the seed is part of the config
    # the report was rendered after the row: our number beside the paper's, with its schedule
    report = (out / "table1.md").read_text()
    assert "| drmm2 | 100 | 11.81 |" in report and "(2 seeds: 0, 1) on 200 test images" in report
    assert (out / "table1_curves.png").stat().st_size > 1000
    assert "paper: 11.81" in capsys.readouterr().out
    # the same command again trains nothing: both runs are in the CSV already
    assert main(argv) == 0
    assert len(list(csv.DictReader(open(out / "table1.csv")))) == 2
    assert capsys.readouterr().out.count("already in") == 2


@needs_mnist
def test_table1_cpu_schedule_resumes_a_killed_run_and_scores_the_test_set_once(tmp_path, monkeypatch, capsys):
    out = tmp_path / "results"
    tiny = [
        "--set",
        "max_steps=4",
        "--set",
        "max_train_samples=400",
        "--set",
        "val_samples=100",
        "--set",
        "eval_every_steps=2",
    ]
    argv = [
        "experiment",
        "table1",
        "--row",
        "drmm5-nn-kl",
        "--labels",
        "100",
        "--out",
        str(out),
        "--data-dir",
        DATA_DIR,
        "--test-images",
        "100",
        "--checkpoint",
        "best-val",
        "--no-report",
        *tiny,
    ]
    real_train = runner.train

    def killed_after_two_steps(cfg, run_dir, resume=False):
        assert not resume
        real_train(dataclasses.replace(cfg, max_steps=2), run_dir)
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "train", killed_after_two_steps)
    with pytest.raises(KeyboardInterrupt):
        main(argv)
    assert not (out / "table1.csv").exists()
    monkeypatch.setattr(runner, "train", real_train)
    assert main(argv) == 0
    assert "resuming at" in capsys.readouterr().out
    (rec,) = csv.DictReader(open(out / "table1.csv"))
    assert rec["schedule"].startswith("mnist-ssl-100-cpu30m+") and rec["steps"] == "4"
    assert rec["checkpoint"] == "best-val" and rec["val_samples"] == "100"
    assert rec["objective"] == "CE+RC+NN+KLent+KLmarg"
    assert float(rec["best_val_error"]) <= float(rec["final_val_error"]) <= 100
    metrics = list(csv.DictReader(open(out / rec["run_dir"] / "metrics.csv")))
    assert [m["step"] for m in metrics] == ["2", "4"] and all(m["test_error"] == "" for m in metrics)


def test_table1_cpu_schedules_exist_for_every_row_and_label():
    for row in E.ROWS.values():
        if row.supervised:
            continue
        for labels in E.SSL_LABELS:
            cfg = E.row_config(row, labels, 1, "cpu")
            assert cfg.num_labeled == int(labels) and cfg.seed == cfg.labeled_seed == 1
            assert cfg.val_samples > 0, row.name  # settings are chosen on validation images, never the test set


def test_headline_recipe_is_the_same_at_every_labeled_count():
    # The headline recipe was chosen at N_L = 100; the cells the paper leaves empty must train it unchanged.
    row = E.ROWS["drmm5-nn-kl"]
    at_100 = dataclasses.asdict(E.row_config(row, "100", 0, "cpu"))
    for labels in ("600", "1000", "3000"):
        other = dataclasses.asdict(E.row_config(row, labels, 0, "cpu"))
        assert other.pop("num_labeled") == int(labels)
        assert other.pop("name") == f"drmm5-nn-kl-{labels}"
        assert {k: v for k, v in at_100.items() if k not in ("num_labeled", "name")} == other


def _differences(row: str, labels: str, config: str) -> dict:
    """Config fields where the row's CPU schedule at ``labels`` differs from ``config`` run as that row (same N_L
    and seed): ``{field: (row's, config's)}``."""
    own = dataclasses.asdict(E.row_config(E.ROWS[row], labels, 0, "cpu"))
    other = dataclasses.asdict(E.row_config(E.ROWS[row], labels, 0, "cpu", config=config))
    return {k: (own[k], other[k]) for k in own if own[k] != other[k]}


def test_unsup_pretr_at_3000_only_fine_tunes_longer():
    # docs/results.md compares the two schedules as "the same pre-training, then 600 or 1200 fine-tuning steps"
    assert _differences("drmm5-unsup-pretr", "3000", "mnist-unsup-pretr-3000-cpu.yaml") == {"epochs": (43, 23)}


def test_rfm_at_100_only_ramps_up_the_kl():
    # docs/results.md compares the two schedules as the same 6 passes with and without the KL ramp-up
    assert _differences("rfm", "100", "mnist-rfm-ssl-6pass-kl-cpu.yaml") == {"kl_rampup_steps": (1000, 0)}
    assert E.row_config(E.ROWS["rfm"], "600", 0, "cpu").kl_rampup_steps == 0


@pytest.mark.parametrize(
    "row, labels, base",
    [("rfm", n, "mnist-rfm-ssl-6pass-kl-cpu.yaml") for n in ("600", "1000", "3000")]
    + [("drmm2", "3000", "mnist-drmm2-ssl-6pass-kl-cpu.yaml")],
)
def test_wd_schedules_only_add_weight_decay_and_halve_the_unsupervised_weights(row, labels, base):
    # docs/results.md compares the two schedules as the same 6 passes with and without these changes
    assert _differences(row, labels, base) == {
        "weight_decay": (0.0005, 0.0),
        "rc_weight": (0.25, 0.5),
        "kl_weight": (0.25, 0.5),
        "kl_marginal_weight": (0.5, 1.0),
    }
    assert E.row_config(E.ROWS[row], "100", 0, "cpu").weight_decay == 0.0


def test_table1_config_replaces_the_rows_cpu_schedule(tmp_path):
    own = E.row_config(E.ROWS["rfm"], "600", 0, "cpu")
    other = E.row_config(E.ROWS["rfm"], "600", 0, "cpu", config="mnist-drmm2-ssl-b09-cpu.yaml")
    assert (own.model, other.model) == ("rfm", "drmm2") and other.num_labeled == 600 and other.seed == 0
    path = tmp_path / "mine.yaml"
    path.write_text((rows.CONFIG_DIR / "mnist-rfm-ssl-b09-cpu.yaml").read_text() + "epochs: 3\n")
    assert E.row_config(E.ROWS["rfm"], "600", 0, "cpu", config=str(path)).epochs == 3
    assert E.schedule_label("cpu", own, None, [], str(rows.cpu_config_path(E.ROWS["rfm"], "600", str(path)))) == "mine"
    with pytest.raises(SystemExit, match="--config: no such file"):
        main(
            ["experiment", "table1", "--row", "rfm", "--labels", "600", "--config", "nope.yaml", "--out", str(tmp_path)]
        )
    with pytest.raises(SystemExit, match="--schedule cpu"):
        main(
            [
                "experiment",
                "table1",
                "--row",
                "rfm",
                "--labels",
                "600",
                "--config",
                str(path),
                "--schedule",
                "smoke",
                "--out",
                str(tmp_path),
            ]
        )


def test_table1_rejects_labels_without_a_config(tmp_path):
    with pytest.raises(SystemExit, match="--labels"):
        main(["experiment", "table1", "--row", "drmm5", "--labels", "250", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="supervised"):
        main(["experiment", "table1", "--row", "rfm-sup", "--labels", "100", "--out", str(tmp_path)])


def _fake_record(row, labels, seed, error, schedule="smoke-300steps-10k", run_dir="runs/x"):
    return {
        "row": row,
        "labels": labels,
        "seed": seed,
        "test_error": error,
        "objective": "CE+RC",
        "final_val_error": "",
        "best_val_error": "",
        "test_images": 10000,
        "epochs": 1,
        "steps": 300,
        "wall_s": 100,
        "device": "cpu:2 cores",
        "threads": 2,
        "checkpoint": "last",
        "val_samples": 0,
        "schedule": schedule,
        "commit": "abc1234",
        "config_hash": "0" * 12,
        "run_dir": run_dir,
    }


def test_report_puts_paper_numbers_beside_ours_and_never_invents_one(tmp_path):
    for seed, err in ((0, "10.00"), (1, "12.00"), (2, "14.00")):
        record = _fake_record("drmm5-nn-kl", "100", seed, err, run_dir=f"runs/s{seed}")
        E.append_csv(tmp_path / "table1.csv", {**record, "wall_s": 100 + 20 * seed})
    E.append_csv(tmp_path / "table1.csv", _fake_record("rfm-sup", "all", 0, "3.00", schedule="full-2ep"))
    (tmp_path / "runs" / "s0").mkdir(parents=True)
    (tmp_path / "runs" / "s0" / "metrics.csv").write_text("step,test_error\n50,40.0\n100,20.0\n")
    main(["experiment", "report", "--out", str(tmp_path)])
    lines = (tmp_path / "table1.md").read_text().splitlines()
    row = next(line for line in lines if line.startswith("| drmm5-nn-kl | 100 |"))
    assert "| 0.57 | CE+RC | 12.00 ± 2.00 (3 seeds: 0, 1, 2) |" in row
    assert "smoke-300steps-10k" in row and "| 100–140 s |" in row
    assert next(line for line in lines if line.startswith("| rfm-sup | all |")).count("3.00 (1 seed: 0)") == 1
    # every paper number we did not measure is listed as "not run", with no measured value
    for name, labels, paper in (
        ("drmm5", "100", "3.50"),
        ("drmm2", "3000", "1.72"),
        ("drmm5-convnet", "all", "0.81"),
        ("drmm5-unsup-pretr", "600", "3.61"),
    ):
        line = next(line for line in lines if line.startswith(f"| {name} | {labels} |"))
        assert f"| {paper} | | not run |" in line
    table = [line for line in lines if line.startswith("| ")]
    assert sum("not run" in line for line in table) == sum(len(r.paper) for r in E.ROWS.values()) - 2
    assert (tmp_path / "table1_curves.png").exists()  # the one run with a metrics.csv


def test_a_row_can_take_another_schedule_at_one_n_l_and_the_report_marks_it(tmp_path):
    row = E.Row("x", "", "c.yaml", {"600": 1.0}, cpu_config="a-{labels}.yaml", cpu_config_at=(("600", "b.yaml"),))
    assert (row.cpu_config_file("100"), row.cpu_config_file("600")) == ("a-100.yaml", "b.yaml")
    drmm5 = E.ROWS["drmm5"]
    at_600 = Path(drmm5.cpu_config_file("600")).stem
    other = next(
        Path(f).stem for f in (drmm5.cpu_config, *dict(drmm5.cpu_config_at).values()) if Path(f).stem != at_600
    )
    for schedule, err in ((at_600, "4.00"), (other, "5.00")):
        E.append_csv(
            tmp_path / "table1.csv", _fake_record("drmm5", "600", 0, err, schedule=schedule, run_dir=f"runs/{schedule}")
        )
    lines = E.table1_lines(E.read_csv(tmp_path / "table1.csv"))
    marked = [line for line in lines if "**row schedule**" in line]
    assert len(marked) == 1 and at_600 in marked[0] and "4.00" in marked[0]


def test_first_crossing_finds_the_first_evaluation_under_the_threshold(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text(
        "epoch,step,test_error,elapsed_s\n0,300,4.0,10\n1,600,1.6,20\n1,900,1.5,30\n2,1200,1.2,40\n3,1800,1.7,60\n"
    )
    rows = E.read_csv(path)
    assert E.first_crossing(rows, 1.5, steps_per_epoch=600) == {"step": 900, "epochs": 1.5, "elapsed_s": 30.0}
    assert E.first_crossing(rows, 1.3, steps_per_epoch=600)["step"] == 1200
    assert E.first_crossing(rows, 1.0, steps_per_epoch=600) is None
    lines = E.convergence_lines(
        {
            "model": "rfm",
            "threshold": 1.5,
            "device": "cpu",
            "git_commit": "x",
            "load_average": "1.0",
            "trainers": {
                "eg": {
                    "reached": {"step": 900, "epochs": 1.5, "elapsed_s": 30.0},
                    "epochs_run": 3.0,
                    "final_error": 1.7,
                    "eval_images": 10000,
                },
                "backprop": {"reached": None, "epochs_run": 3.0, "final_error": 2.0, "eval_images": 10000},
            },
        }
    )
    assert any("epoch 1.50 (step 900) | 30 s" in line for line in lines)
    assert any("not reached within 3.00 epochs" in line for line in lines)


def test_smoke_schedule_spans_its_steps_and_full_keeps_the_protocol():
    for name in ("drmm5-nn-kl", "rfm-sup", "drmm5-unsup-pretr"):
        cfg = E.row_config(E.ROWS[name], "all" if E.ROWS[name].supervised else "100", 0, "smoke")
        assert cfg.max_steps == E.CPU_STEPS and cfg.max_train_samples == E.CPU_TRAIN_IMAGES
        steps = sum(rows._steps_per_epoch(cfg, E.CPU_TRAIN_IMAGES, e) for e in range(cfg.epochs))
        assert E.CPU_STEPS <= steps < E.CPU_STEPS + 160, (name, steps)  # the lr decay spans the short run
    headline = E.row_config(E.ROWS["drmm5-nn-kl"], "100", 0, "smoke")
    assert E.epochs_run(headline, 300) == pytest.approx(300 / 309)  # (10000 - 100) // 32 steps per epoch
    plain = E.row_config(E.ROWS["drmm5"], "100", 0, "smoke")
    assert plain.nn_weight == 0 and plain.rc_weight > 0 and plain.kl_weight == 0.5 and plain.kl_marginal_weight == 1.0
    full = E.row_config(E.ROWS["drmm5-nn-kl"], "100", 2, "full")
    assert (full.epochs, full.batch_size, full.lr_init, full.lr_final, full.max_steps) == (500, 200, 1e-3, 1e-6, 0)
    assert full.seed == full.labeled_seed == 2 and full.kl_weight == full.nn_weight == 0.5
    short = E.row_config(E.ROWS["drmm5-unsup-pretr"], "100", 0, "full", epochs=31)
    assert short.epochs == 31 and short.pretrain_epochs == 1
    assert E.schedule_label("full", short, 31, []) == "full-31ep"
    assert E.config_hash(full) != E.config_hash(E.row_config(E.ROWS["drmm5-nn-kl"], "100", 0, "full"))


def test_throughput_writes_images_per_second(tmp_path):
    m = E.run_throughput("rfm", 8, tmp_path, warmup=1, repeats=2, data_dir=str(tmp_path / "nodata"))
    assert {s["trainer"] for s in m["steps"]} == {"eg", "backprop"}
    assert all(s["images_per_s"] > 0 and s["data"] == "noise" for s in m["steps"])
    r = m["eg_vs_reference"]
    assert r["pairs"] == 2 and r["ratio"] > 0 and r["reference_median_step_s"] > 0
    assert r["backend"] in dk.available_backends()
    E.run_throughput("rfm", 8, tmp_path, warmup=0, repeats=1, data_dir=str(tmp_path / "nodata"))
    history = json.loads((tmp_path / "throughput.json").read_text())
    assert len(history["measurements"]) == 2  # appended, not overwritten
    assert any(line.startswith("| cpu") for line in E.throughput_lines(history))


@needs_mnist
def test_convergence_runs_eg_and_backprop_on_the_same_schedule(tmp_path):
    result = E.run_convergence(
        "rfm",
        "smoke",
        tmp_path,
        threshold=99.0,
        data_dir=DATA_DIR,
        extra=["max_steps=2", "max_train_samples=200", "eval_samples=100", "eval_every_steps=1"],
    )
    assert set(result["trainers"]) == {"eg", "backprop"}
    for t in result["trainers"].values():
        assert t["steps"] == 2 and t["reached"] is not None and t["reached"]["step"] == 1
    assert json.loads((tmp_path / "convergence-rfm.json").read_text())["model"] == "rfm"
    # each trainer's final weights are a supervised row of Table 1
    rows = list(csv.DictReader(open(tmp_path / "table1.csv")))
    assert [(r["row"], r["labels"], r["checkpoint"]) for r in rows] == [
        ("rfm-sup", "all", "last"),
        ("rfm-convnet", "all", "last"),
    ]
    assert [float(r["test_error"]) for r in rows] == [round(t["final_error"], 2) for t in result["trainers"].values()]
    # the CSV and the convergence table print the same wall time
    assert [r["wall_s"] for r in rows] == [f"{t['wall_s']:.0f}" for t in result["trainers"].values()]


@needs_mnist
def test_convergence_cpu_schedule_records_its_overrides(tmp_path):
    extra = ["max_steps=2", "max_train_samples=200", "eval_samples=100", "eval_every_steps=1"]
    result = E.run_convergence("rfm", "cpu", tmp_path, threshold=99.0, data_dir=DATA_DIR, extra=extra)
    # each trainer names its own config (the backprop one must not overwrite the EG one's)
    assert [t["schedule"] for t in result["trainers"].values()] == [
        f"mnist-sup-rfm{s}-cpu+" + ",".join(extra) for s in ("", "-backprop")
    ]
    assert any("`mnist-sup-rfm-cpu+" in line for line in E.convergence_lines(result))
    rows = list(csv.DictReader(open(tmp_path / "table1.csv")))
    assert [r["schedule"] for r in rows] == [f"mnist-sup-rfm{s}-cpu+" + ",".join(extra) for s in ("", "-backprop")]


@needs_mnist
def test_study_trial_logs_its_validation_curve_and_never_looks_at_the_test_set(tmp_path, monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("study", Path(rows.REPO) / "experiments" / "study.py")
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    splits = []
    real = study.train.__globals__["evaluate"]

    def spy(model, data, num=0, batch_size=1000, split="test"):
        splits.append(split)
        return real(model, data, num, batch_size, split)

    monkeypatch.setitem(study.train.__globals__, "evaluate", spy)
    out = tmp_path / "study.csv"
    argv = [
        "T99",
        "--config",
        str(Path(rows.REPO) / "configs" / "mnist-rfm-ssl-b09-cpu.yaml"),
        "--out",
        str(out),
        "--runs",
        str(tmp_path / "runs"),
        "--set",
        f"data_dir={DATA_DIR}",
        "--set",
        "max_steps=4",
        "--set",
        "eval_every_steps=2",
        "--set",
        "max_train_samples=600",
        "--set",
        "val_samples=100",
    ]
    assert study.main(argv) == 0
    assert splits == ["val", "val"]
    (rec,) = csv.DictReader(open(out))
    assert rec["trial"] == "T99" and rec["steps"] == "4" and rec["val_error_curve"].startswith("2:")
    assert rec["final_val_error"] == rec["val_error_curve"].split(":")[-1]
    with pytest.raises(SystemExit):  # the same trial id twice
        study.main(argv)
    with pytest.raises(SystemExit):  # no validation split: refused
        study.main(["T98", "--config", str(Path(rows.REPO) / "configs" / "mnist-sup-rfm.yaml"), "--out", str(out)])


def test_curves_name_the_schedule_and_dash_earlier_ones_when_a_row_has_several():
    row_schedule = Path(rows.ROWS["drmm2"].cpu_config_file("600")).stem  # the "-" curve follows the row's choice
    current = _fake_record("drmm2", "600", 0, "3.64", schedule=row_schedule)
    earlier = _fake_record("drmm2", "600", 0, "5.20", schedule="mnist-drmm2-ssl-b09-cpu")
    one = {row_schedule}
    both = one | {"mnist-drmm2-ssl-b09-cpu"}
    assert E.curve_style(current, "val", one) == ("N_L=600 s0 (val; test 3.64)", "-")
    label, style = E.curve_style(current, "val", both)
    assert label.endswith(row_schedule) and style == "-"
    label, style = E.curve_style(earlier, "val", both)
    assert label.endswith("mnist-drmm2-ssl-b09-cpu") and style == "--"


def test_curves_take_their_colour_from_n_l_and_their_marker_from_the_seed():
    a0, a1 = _fake_record("rfm", "600", 0, "5.84"), _fake_record("rfm", "600", 1, "6.02")
    b0 = _fake_record("rfm", "3000", 0, "3.47")
    (ca0, ma0), (ca1, ma1), (cb0, mb0) = map(E.curve_color_marker, (a0, a1, b0))
    assert ca0 == ca1 and ma0 != ma1  # one N_L: one colour, seeds apart by marker
    assert ca0 != cb0 and ma0 == mb0
    assert len({E.curve_color_marker(_fake_record("rfm", n, 0, "1"))[0] for n in E.SSL_LABELS}) == 4


def test_curve_axes_end_on_labelled_values():
    assert E.log_axis_ends(1.2, 2.8) == (1.0, 3.0)
    assert E.log_axis_ends(2.82, 13.84) == (2.0, 20.0)
    assert E.log_axis_ends(3.0, 5.0) == (3.0, 5.0)  # already on a label: kept
    low, high = E.log_axis_ends(0.57, 89.9)
    assert low == pytest.approx(0.5) and high == pytest.approx(100.0)


def test_every_row_names_its_objective():
    labels = {
        name: E.row_config(
            row, E.ALL_LABELS if row.supervised else "100", 0, "cpu" if row.cpu_config else "smoke"
        ).objective_label()
        for name, row in E.ROWS.items()
    }
    # the paper's KL, in the reading validation chose
    assert labels["drmm5"] == labels["drmm2"] == labels["rfm"] == "CE+RC+KLent+KLmarg"
    assert labels["drmm5-nn-kl"] == "CE+RC+NN+KLent+KLmarg"
    assert labels["drmm5-unsup-pretr"] == "RC+NN+KLent>CE+RC+NN+KLent"
    assert labels["drmm5-convnet"] == labels["rfm-convnet"] == "CE"
    for name, row in E.ROWS.items():  # the description says the same
        assert labels[name] in row.description, name
    cfg = E.row_config(E.ROWS["drmm5"], "100", 0, "smoke", extra=["kl_weight=0.1", "kl_sign=1", "kl_marginal_weight=0"])
    assert cfg.objective_label() == "CE+RC+KLprior"
    cfg = E.row_config(
        E.ROWS["drmm5"],
        "100",
        0,
        "smoke",
        extra=["kl_weight=0", "nonneg_term=moment_matching", "nn_weight=0.5"],
    )
    assert cfg.objective_label() == "CE+RC+MM+KLmarg"
    # Adam's weight decay is an L2 penalty in the gradient, so it is named too
    assert E.row_config(E.ROWS["rfm"], "600", 0, "cpu").objective_label() == "CE+RC+KLent+KLmarg+L2"
    assert "CE+RC+KLent+KLmarg+L2" in E.ROWS["rfm"].description
    cfg = E.row_config(E.ROWS["drmm5-unsup-pretr"], "600", 0, "cpu", extra=["weight_decay=0.0001"])
    assert cfg.objective_label() == "RC+NN+KLent+L2>CE+RC+NN+KLent+L2"
    cfg = E.row_config(E.ROWS["drmm5-convnet"], E.ALL_LABELS, 0, "cpu", extra=["weight_decay=0.0001"])
    assert cfg.objective_label() == "CE+L2"


def test_every_committed_run_carries_the_objective_its_config_trains():
    # table1.csv stores each run's objective when it finishes; a change to objective_label must relabel the
    # finished runs too (as when L2 was added), or the report would name terms a run did not train
    results = rows.CONFIG_DIR.parent / "results"
    records = runner.read_csv(results / "table1.csv")
    assert records
    for rec in records:
        cfg = config_from_dict(read_yaml_mapping(results / rec["run_dir"] / "config.yaml"))
        assert rec["objective"] == cfg.objective_label(), rec["run_dir"]


def test_config_hash_is_pinned_and_new_fields_at_their_default_keep_it():
    # The run folder of drmm5-nn-kl N_L=100 seed 3 (results/runs/...-72ef9b) was named with this hash: if it
    # changed, `drmm experiment table1` would silently train that finished row again.
    cfg = E.row_config(E.ROWS["drmm5-nn-kl"], "100", 3, "cpu")
    assert E.config_hash(cfg) == "72ef9b007754"
    assert E.config_hash(dataclasses.replace(cfg, data_dir="/elsewhere", progress=True)) == "72ef9b007754"
    assert E.config_hash(dataclasses.replace(cfg, kl_weight=0.25)) != "72ef9b007754"
    grown = dataclasses.make_dataclass("Grown", [("a_new_option", float, 0.0)], bases=(TrainConfig,))
    assert E.config_hash(grown(**dataclasses.asdict(cfg))) == "72ef9b007754"
    assert E.config_hash(grown(**dataclasses.asdict(cfg), a_new_option=1.0)) != "72ef9b007754"


def test_a_csv_of_the_old_layout_is_upgraded_and_a_run_under_an_old_hash_is_recognised(tmp_path):
    run = tmp_path / "runs" / "old-run"
    run.mkdir(parents=True)
    cfg = E.row_config(E.ROWS["drmm2"], "100", 0, "cpu")
    from drmm.run_dir import write_config

    write_config(run, cfg)
    (run / "metrics.csv").write_text("step,val_error\n10,9.5\n20,8.25\n")
    old_fields = [f for f in E.CSV_FIELDS if f not in ("objective", "final_val_error", "best_val_error")]
    old_fields.insert(old_fields.index("commit"), "val_error")
    with open(tmp_path / "table1.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=old_fields)
        w.writeheader()
        w.writerow(
            {
                **{k: "" for k in old_fields},
                "row": "drmm2",
                "labels": "100",
                "seed": "0",
                "val_error": "8.00",
                "run_dir": "runs/old-run",
                "test_error": "9.00",
            }
        )
    E.append_csv(tmp_path / "table1.csv", _fake_record("rfm", "600", 0, "5.00", run_dir="runs/new"))
    old, new = E.read_csv(tmp_path / "table1.csv")
    assert list(old) == E.CSV_FIELDS and new["row"] == "rfm"
    assert (old["best_val_error"], old["final_val_error"], old["objective"]) == ("8.00", "8.25", "CE+RC+KLent+KLmarg")
    # the folder name does not match today's hash, but its saved config trains the same thing: not trained again
    records = E.read_csv(tmp_path / "table1.csv")
    assert E.recorded_run(records, tmp_path, "runs/other-name", "drmm2", "100", 0, cfg)["run_dir"] == "runs/old-run"
    assert (
        E.recorded_run(
            records, tmp_path, "runs/other-name", "drmm2", "100", 1, E.row_config(E.ROWS["drmm2"], "100", 1, "cpu")
        )
        is None
    )


def test_the_report_gives_held_out_seeds_a_line_of_their_own(tmp_path):
    for seed, err in ((0, "1.00"), (1, "1.20"), (3, "2.00"), (4, "2.20"), (5, "2.40")):
        E.append_csv(tmp_path / "table1.csv", _fake_record("drmm5-nn-kl", "100", seed, err, run_dir=f"runs/s{seed}"))
    lines = [line for line in E.table1_lines(E.read_csv(tmp_path / "table1.csv")) if "drmm5-nn-kl | 100" in line]
    assert len(lines) == 2
    assert "1.10 ± 0.14 (2 seeds: 0, 1)" in lines[0] and "2.20 ± 0.20 (3 held-out seeds: 3, 4, 5)" in lines[1]


def test_a_cpu_whose_name_has_no_generation_is_told_apart_by_family_and_model():
    zen4 = "processor\t: 0\ncpu family\t: 25\nmodel\t\t: 17\nmodel name\t: AMD EPYC\n\nprocessor\t: 1\n"
    zen1 = zen4.replace(": 25", ": 23").replace(": 17", ": 1")
    assert runner.cpu_description(zen4, "x86_64", 2) == "cpu:AMD EPYC (family 25 model 17, 2 cores)"
    assert runner.cpu_description(zen1, "x86_64", 2) == "cpu:AMD EPYC (family 23 model 1, 2 cores)"
    xeon = "cpu family\t: 6\nmodel\t\t: 106\nmodel name\t: Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz\n"
    assert runner.cpu_description(xeon, "x86_64", 2) == "cpu:Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz (2 cores)"
    assert runner.cpu_description("", "aarch64", 4) == "cpu:aarch64 (4 cores)"
