"""report.md from the report.json content: the verdict first, then the evidence for it.

Units are said where the numbers are: params and MACs in millions (MACs per image, a fused
multiply-add counted once), latency as the median in ms with its runtime, batch and threads.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from profiling.cost.config import RUNTIME_NAMES
from profiling.report.constraints import latency_of

__all__ = ["render_markdown", "verdict"]

_DASH = "—"


def _f(x: float | None, digits: int = 3) -> str:
    return _DASH if x is None else f"{x:.{digits}f}"


def _m(x: float | None) -> str:
    """A count in millions, e.g. 0.945 M."""
    return _DASH if x is None else f"{x / 1e6:.3g} M"


def _ms(x: float | None) -> str:
    return _DASH if x is None else f"{x:.3g}"


def _with_ci(test: dict[str, Any], metric: str) -> str:
    ci = test.get(f"{metric}_ci")
    point = _f(test.get(metric))
    return point if not ci or None in ci else f"{point} [{ci[0]:.2f}, {ci[1]:.2f}]"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _facts(report: dict[str, Any], name: str) -> str:
    """Speed, size and accuracy of one model in a phrase, on the constraint's runtime."""
    row, c = report["models"][name], report["constraints"]
    fig = latency_of(row, c["runtime"], c["batch"])
    load = f", {fig['under_load']}" if fig and fig.get("under_load") else ""
    precision = "int8" if row.get("quantised_from") else "fp32"
    per = (f"{c['batch']} image(s) of {row['tiles_per_image']} tiles in one batch" if row.get("tiles_per_image")
           else f"batch {c['batch']}")
    speed = (f"{_ms(fig['median'])} ms median on {c['runtime']} ({precision}, {per}, "
             f"{fig['threads']} threads{load})" if fig else f"latency on {c['runtime']} not measured")
    level = row.get("image") or row
    test = level["test"]
    what = "image-level test AUROC" if row.get("image") else "test AUROC"
    return (f"{speed}, {_m(row.get('params'))} params, {_m(row.get('macs'))} MACs, "
            f"{what} {_with_ci(test, 'auroc')}, recall {_f(test.get('recall'))} at threshold {level['threshold']:.3g}")


def _against_teacher(report: dict[str, Any], name: str) -> str:
    """The model's latency, params and MACs as multiples of the teacher's (0.1x = ten times less)."""
    rows, c = report["models"], report["constraints"]
    if "teacher" not in rows or name == "teacher":
        return ""
    t, s = rows["teacher"], rows[name]
    teacher_runtime = "onnx" if c["runtime"] == "onnx_int8" else c["runtime"]  # the fp32 teacher has no int8 figure
    ft, fs = latency_of(t, teacher_runtime, c["batch"]), latency_of(s, c["runtime"], c["batch"])
    pairs = {"latency": (fs and fs["median"], ft and ft["median"]), "params": (s.get("params"), t.get("params")),
             "MACs": (s.get("macs"), t.get("macs"))}
    parts = [f"{what} {mine / theirs:.3g}x" for what, (mine, theirs) in pairs.items() if mine and theirs]
    st, tt = (s.get("image") or s)["test"], (t.get("image") or t)["test"]
    if st.get("auroc") is not None and tt.get("auroc") is not None:
        parts.append(f"AUROC {st['auroc'] - tt['auroc']:+.3f}")
    return f"; relative to the teacher: {', '.join(parts)}" if parts else ""


def _amount(name: str, value: float | None) -> str:
    """A constraint's limit or value in its unit: counts in millions, latency in ms, scores as they are."""
    if value is None:
        return _DASH
    if name in ("max_params", "max_macs"):
        return _m(value)
    return f"{value:.3g} ms" if name == "max_latency_ms" else f"{value:.3f}"


def _failure(check: dict[str, Any]) -> str:
    if check["value"] is None:
        return f"{check['name']} (not verified: {check.get('why')})"
    return f"{check['name']} ({_amount(check['name'], check['value'])}, needs {check['op']} " \
           f"{_amount(check['name'], check['limit'])})"


def verdict(report: dict[str, Any]) -> str:
    """One line: does the deployed model meet the constraints, and at what speed, size and accuracy."""
    deployed, c = report.get("deployed"), report["constraints"]
    if deployed is None:
        return f"**NO VERDICT**: {c.get('why', 'nothing to deploy')}."
    name, checks = deployed["model"], c["checks"]
    label = f"{name} on {deployed.get('runtime', c['runtime'])}"
    tail = f"{_facts(report, name)}{_against_teacher(report, name)}."
    if not checks:
        return f"**NO CONSTRAINTS SET** (add `constraints:` to the config for a pass/fail): {label} (deployed): {tail}"
    if c["passed"]:
        return f"**PASS**: {label} (deployed) meets all {len(checks)} constraints: {tail}"
    failing = [ch for ch in checks if ch["passed"] is not True]
    return (f"**FAIL**: {label} (deployed) misses {len(failing)} of {len(checks)} constraints: "
            f"{'; '.join(_failure(ch) for ch in failing)}. {tail}")


# ----------------------------------------------------------------------------- sections
def _latency_columns(rows: dict[str, dict[str, Any]]) -> list[str]:
    keys = {k for r in rows.values() for k in r.get("latency_ms", {})}

    def order(key: str) -> tuple[int, int]:
        runtime, batch = key.rsplit("_b", 1)
        return RUNTIME_NAMES.index(runtime) if runtime in RUNTIME_NAMES else 99, int(batch)

    return sorted(keys, key=order)


def _models_section(report: dict[str, Any]) -> str:
    rows, deployed = report["models"], (report.get("deployed") or {}).get("model")
    columns = _latency_columns(rows)
    batch = report["constraints"]["batch"]
    header = ["model", "arch", "learned from", "params", "MACs", *[f"{k} (ms)" for k in columns],
              f"fastest b{batch}", "size (MB)", "AUROC [95% CI]", "F1 [95% CI]", "recall", "threshold"]
    body, loaded = [], []
    for name, r in rows.items():
        lat = []
        for k in columns:
            figure = r["latency_ms"].get(k) or {}
            lat.append(_ms(figure.get("median")) + (" †" if figure.get("under_load") else ""))
            if figure.get("under_load"):
                loaded.append(f"{name} {k}: {figure['under_load']}")
        fastest = (r.get("fastest") or {}).get(f"b{batch}")
        body.append([f"**{name}** (deployed)" if name == deployed else name, f"{r['arch']} @{r['img_size']}px",
                     _learned(r.get("learned_from")), _m(r.get("params")), _m(r.get("macs")), *lat,
                     fastest["runtime"] if fastest else _DASH,
                     _f(r.get("size_mb"), 2),
                     _with_ci(r["test"], "auroc"), _with_ci(r["test"], "f1"), _f(r["test"].get("recall")),
                     f"{r['threshold']:.4g}"])
    tiled = any(r.get("image") for r in rows.values())
    title = "## Models (test split, tiles: each tile scored on its own)" if tiled else "## Models (test split)"
    text = title + "\n\n" + _table(header, body)
    if tiled:
        text += ("\n\nWith data.tiles every figure of this table is per tile: AUROC, F1 and recall over the labelled "
                 "test tiles at the tile threshold, latency per batch of tiles. Whole images are in the next section.")
    prof, machine = report.get("profile") or {}, report.get("machine") or {}
    settings = prof.get("settings")
    if settings:
        text += (f"\n\nLatency: median ms per batch of {settings['runs']} timed runs after {settings['warmup']} "
                 f"warm-up, {settings['threads']} thread(s) (PyTorch intra-op, ONNX Runtime intra-op, OpenVINO "
                 f"inference threads), on {machine.get('cpu')}; torch {machine.get('torch')}, onnxruntime "
                 f"{machine.get('onnxruntime')}"
                 + (f", openvino {machine['openvino']}" if machine.get("openvino") else "")
                 + ". "
                 + (f"CUDA runtimes on {machine['gpu']}. " if machine.get("gpu") else "")
                 + "p90, spread and images/s are in report.json. Runtime names: `<runtime>_b<batch>`; the int8 "
                 "model runs only in ONNX Runtime (`onnx_int8`).")
        text += f"\n\nMACs: {prof.get('macs_note')}. Size: the ONNX file where exported, else the safetensors file."
    if loaded:
        text += ("\n\n† No quiet window came (other processes kept more than "
                 f"{(settings or {}).get('max_other_load', 0.25)} cores busy), so these figures were measured anyway "
                 "and are inflated, not comparable with the others: " + "; ".join(loaded) + ".")
    checked = [f"{n} on {rt}: max |Δp| {ch['max_abs_diff_prob']:.1e}, {100 * ch['agreement']:.1f}% same decisions"
               for n, r in rows.items() for rt, ch in (r.get("runtime_checks") or {}).items()]
    if checked:
        text += ("\n\nChecked against PyTorch on test images (export/verify.json; an int8 model against the fp32 "
                 "PyTorch model): " + "; ".join(checked) + ".")
    skipped = {f"{n} {k}": why for n, r in rows.items() for k, why in (r.get("latency_skipped") or {}).items()}
    if skipped:
        text += "\n\nNo figure for: " + "; ".join(f"{k}: {why}" for k, why in skipped.items()) + "."
    return text


def _images_section(report: dict[str, Any]) -> str:
    """A tiled run's image level: each image scored by its worst tile, at the image threshold."""
    rows = {n: r for n, r in report["models"].items() if r.get("image")}
    if not rows:
        return ""
    c, deployed = report["constraints"], (report.get("deployed") or {}).get("model")
    n = next(iter(rows.values())).get("tiles_per_image")
    body = []
    for name, r in rows.items():
        im = r["image"]
        runtime = c["runtime"] if not r.get("quantised_from") or c["runtime"] != "onnx" else "onnx_int8"
        lat = (im.get("latency_ms") or {}).get(runtime) or {}
        body.append([f"**{name}** (deployed)" if name == deployed else name, _f((im.get("val") or {}).get("auroc")),
                     _with_ci(im["test"], "auroc"), _with_ci(im["test"], "f1"), _f(im["test"].get("recall")),
                     _f(im["test"].get("specificity")), f"{im['threshold']:.4g}",
                     "yes" if im["threshold_check"]["agrees"] else "**no**", _ms(lat.get("tile")),
                     _ms(lat.get("image"))])
    header = ["model", "val AUROC", "test AUROC [95% CI]", "test F1 [95% CI]", "test recall", "test specificity",
              "image threshold", "re-chosen on val agrees", f"{c['runtime']} ms per tile", f"ms per image ({n} tiles)"]
    return ("## Whole images (each image's score: its worst tile)\n\n"
            f"An image is cut into {n} tiles; its probability of defect is the maximum over its tiles (slivers "
            "included: a tile holding too little of a defect box is never trained on, but it is scored). The image "
            "threshold is chosen on the validation images' scores by the same rule, never on test. **The deployed "
            "model's choice and the constraints use this level**: a line accepts or rejects whole images, and a "
            "latency is that of one image, all its tiles in one batch.\n\n" + _table(header, body))


def _limit_section(report: dict[str, Any]) -> str:
    limit = (report.get("profile") or {}).get("limit")
    if not limit:
        return ""
    batch = report["constraints"]["batch"]
    body = []
    for name, r in report["models"].items():
        ideal = (r.get("ideal_ms") or {}).get(f"b{batch}")
        best = min(((v["median"], k) for k, v in r["latency_ms"].items() if k.endswith(f"_b{batch}")), default=None)
        memory = ", ".join(f"{k} {v:.3g}" for k, v in (r.get("peak_memory_mb") or {}).items())
        body.append([name, _m(r.get("macs")), _ms(ideal), f"{_ms(best[0])} ({best[1]})" if best else _DASH,
                     f"{best[0] / ideal:.3g}x" if best and ideal else _DASH, memory or _DASH])
    return (f"## Cost against the machine's limit\n\nfp32 matmul peak of this machine: "
            f"{limit['matmul_peak_gflops']:.1f} GFLOP/s with {limit['threads']} thread(s) ({limit['what']}).\n\n"
            + _table(["model", "MACs", f"ideal b{batch} (ms)", f"fastest b{batch} (ms, runtime)", "x ideal",
                      "peak inference memory beyond weights (MB)"], body))


def _constraints_section(report: dict[str, Any]) -> str:
    c, deployed = report["constraints"], report.get("deployed")
    if deployed is None:
        return f"## Constraints\n\nNot checked: {c.get('why')}."
    text = (f"## Constraints (deployed: {deployed['model']} on {deployed.get('runtime', c['runtime'])})\n\n"
            f"Chosen as {deployed['why']}.\n\n")
    if not c["checks"]:
        return text + "No constraint is set (`constraints:` in the config), so nothing is checked."
    body = [[ch["name"], f"{ch['op']} {_amount(ch['name'], ch['limit'])}", _amount(ch["name"], ch["value"]),
             {True: "pass", False: "**FAIL**", None: "**not verified**"}[ch["passed"]],
             ch["what"] + (f" ({ch['why']})" if ch.get("why") else "")] for ch in c["checks"]]
    result = "**all pass**" if c["passed"] else "**not met**"
    return text + _table(["constraint", "limit", "value", "result", "measured as"], body) + f"\n\nOverall: {result}."


def _thresholds_section(report: dict[str, Any]) -> str:
    body = []
    for name, r in report["models"].items():
        ch = r["threshold_check"]
        body.append([name, ch["rule"], f"{r['threshold']:.6g}", f"{ch['rechosen_on_val']:.6g}",
                     "yes" if ch["agrees"] else "**no**", _f(ch["val_recall"]), _f(ch["val_specificity"]),
                     f"{ch['val_defects']} / {ch['val_normals']}"])
    text = ("## Thresholds (chosen on validation, never on test)\n\n"
            + _table(["model", "rule", "threshold", "re-chosen from saved val scores", "agree", "val recall",
                      "val specificity", "val defects / normals"], body))
    rule = report["eval"]["threshold"]
    if rule.startswith("recall@"):
        target = float(rule.split("@")[1])
        few = {r["threshold_check"]["val_defects"] for r in report["models"].values()}
        if target < 1 and min(few) < 1 / (1 - target):
            text += (f"\n\nWith fewer than {1 / (1 - target):.0f} validation defects, `{rule}` means catching "
                     "every validation defect.")
    return text


def _learned(seen: dict[str, int] | None) -> str:
    """Training images a model learned from: labeled, and unlabeled (taught by the teacher)."""
    if not seen:
        return "—"
    unit = f" {seen['unit']}" if seen.get("unit") else ""
    return f"{seen['labeled']} labeled{unit}" + (f" + {seen['unlabeled']} unlabeled" if seen.get("unlabeled") else "")


def _delta(vs: dict[str, Any]) -> str:
    d = vs.get("auroc_delta")
    if not d:
        return "-"
    return f"{d['delta']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]"


def _splits_section(report: dict[str, Any]) -> str:
    body = []
    for name, r in report["models"].items():
        s = r["splits"]
        body.append([name, *[_f(s.get(sp, {}).get("auroc")) for sp in ("train", "val", "test")],
                     *[_f(s.get(sp, {}).get("f1")) for sp in ("train", "val", "test")],
                     *[_f(s.get(sp, {}).get("recall")) for sp in ("train", "val", "test")]])
    header = ["model", "AUROC train", "val", "test", "F1 train", "val", "test", "recall train", "val", "test"]
    text = "## Train / validation / test\n\n" + _table(header, body)
    pairs = [[n, _f(r["vs_teacher"]["agreement"]), _f(r["vs_teacher"]["kl_nats"], 4), _delta(r["vs_teacher"])]
             for n, r in report["models"].items() if r.get("vs_teacher")]
    if pairs:
        text += ("\n\nTeacher vs the others on test: agreement is the fraction of identical decisions (each at its own "
                 "threshold); KL(teacher ‖ model) in nats per image; AUROC − teacher's with its paired bootstrap "
                 "interval (both models on the same resamples): a gap inside the interval is one this test split "
                 "cannot tell from zero.\n\n"
                 + _table(["model", "agreement", "KL (nats)", "AUROC − teacher"], pairs))
    return text


def _data_section(report: dict[str, Any]) -> str:
    data, leak = report.get("data"), report["leakage"]
    if data is None:
        return f"## Data\n\nNo data/report.json in the run.\n\n{leak['statement']}"
    counts = data.get("counts", {})
    body = [[sp, str(c.get("normal", 0)), str(c.get("defect", 0))] for sp, c in counts.items()]
    where = f" ({data['root']})" if data.get("root") else ""
    skipped = data.get("skipped", 0)
    reasons = ", ".join(f"{k}: {v}" for k, v in (data.get("skipped_by_reason") or {}).items())
    unlabeled = data.get("unlabeled")
    pool = (f"\n\nUnlabeled: {unlabeled['images']} images, no model learned a label from them: a pool of "
            f"{unlabeled['pool']}" + (f", and {unlabeled['held_back_from_train']} training images whose labels "
                                       f"data.label_fraction {unlabeled['label_fraction']} held back"
                                       if unlabeled["held_back_from_train"] else "")
            + ". A distilled student learns from the teacher's outputs on them." if unlabeled else "")
    tiles = data.get("tiles")
    if tiles:
        t_body = [[sp, str(c["tiles"]["normal"]), str(c["tiles"]["defect"]), str(c["tiles"]["excluded"]),
                   str(c["defect_images_without_defect_tile"])] for sp, c in tiles["counts"].items()]
        cfg = tiles["config"]
        how = f"grid {cfg['grid']}" if cfg.get("grid") else f"{cfg['size']} px tiles"
        pool += (f"\n\nTiles ({how}, overlap {cfg['overlap']}, {tiles['tiles_per_image']['max']} per image; "
                 "a tile is a "
                 f"defect when it holds at least {cfg['min_box_fraction']} of a defect box, a sliver when it holds "
                 "less: scored, never trained on):\n\n"
                 + _table(["split", "normal tiles", "defect tiles", "slivers", "defect images without a defect tile"],
                          t_body))
    return (f"## Data\n\nSource: {data.get('source')}{where}; {data.get('split_method')}; "
            f"{data.get('total')} images used, {skipped} skipped{f' ({reasons}; listed in data/skipped.csv)' if skipped else ''}."
            f"\n\n{_table(['split', 'normal', 'defect'], body)}{pool}\n\n**Leakage:** {leak['statement']}")


def render_markdown(report: dict[str, Any]) -> str:
    """The whole report.md."""
    sections = [
        f"# Report: {report['run']}\n\n{report['verdict']}",
        _models_section(report),
        _images_section(report),
        _constraints_section(report),
        _limit_section(report),
        _thresholds_section(report),
        _splits_section(report),
        _data_section(report),
        "## Plots\n\n" + "\n".join(f"![{p.rsplit('/', 1)[-1][:-4]}]({p})" for p in report.get("plots", [])),
    ]
    if report.get("notes"):
        sections.append("## Notes\n\n" + "\n".join(f"- {n}" for n in report["notes"]))
    return "\n\n".join(s for s in sections if s) + "\n"
