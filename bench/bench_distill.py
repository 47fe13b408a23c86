"""Distillation benchmarks: recovery of a damaged classifier, and step time against PyTorch.

    python bench/run.py distill

1. Recovery. The sample digits MLP is magnitude-pruned (numpy, here) until its top-1
   agreement with the original on held-out rows drops by at least 10 points; then
   ``modelshrink distill`` trains it back against the original on the other rows (pruned
   weights stay zero). Printed: agreement before/after and the share of lost points won back
   (target >= 80 %).
2. Step time. One training step (forward, distillation loss, backward, AdamW) of the sample
   MLP (batch 128), CNN (batch 32) and transformer (batch 32, 16 tokens), with the KL loss of
   their class scores, and of the YOLO-style detector of ``tests/patterns.py::fpn_detector``
   (batch 8 at 160x160), with the MSE loss distill picks for its box map, as an onnxruntime
   graph against the same model, batch and loss in PyTorch, both on one thread, interleaved
   rounds, median. Targets: <= 1.3x PyTorch for the MLP and transformer, <= 1.6x for the CNN,
   <= 1.5x for the detector. PyTorch is not a dependency: without it this part is skipped and
   says how to run it.
3. Data larger than memory. ``modelshrink distill --epochs 1`` on an image model (input
   ``[N, 3, 224, 224]``, 602 KB per row) with generated ``--data`` of 100 MB and of 4 GB, in
   two layouts: a folder holding ``image.npy`` (memory-mapped) and a folder of ``.npz`` files
   of 32 rows each. Peak RSS of the child process (``os.wait4``), and rows/s. Target: the
   4 GB run's peak RSS below 1.5x the 100 MB run's, in each layout. Then, on the 100 MB data,
   the teacher's outputs cached once vs computed per batch (3 epochs, in-process, median of
   interleaved rounds): which is faster.

    python bench/run.py distill                      # all three
    python bench/bench_distill.py steps              # only the second
    python bench/bench_distill.py data               # only the third (DATA_GB=1 for a quicker one)
"""

from __future__ import annotations

import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from common import ROOT, run_cli, run_cli_rss

SAMPLES = ROOT / "sample_models"
HELD_OUT = 120  # rows of digits_mlp.npz kept for measuring agreement, never trained on
RECOVERY_TARGET = 0.80
STEP_TARGETS = {"digits_mlp": 1.3, "digits_cnn": 1.6, "tiny_transformer": 1.3, "fpn_detector": 1.5}
BATCH = {"digits_mlp": 128, "digits_cnn": 32, "tiny_transformer": 32, "fpn_detector": 8}
# The detector's input side: a multiple of 32 like a YOLO input (its maps are 80, 40 and 20
# wide), small enough that a step takes tens of milliseconds on one core.
DETECTOR_SIZE = 160
TEMPERATURE = 2.0
TORCH_HOWTO = (
    "python3 -m venv /tmp/distill-torch && /tmp/distill-torch/bin/pip install torch==2.13.0 "
    "&& /tmp/distill-torch/bin/pip install -e . && /tmp/distill-torch/bin/python bench/run.py distill"
)


# --- recovery --------------------------------------------------------------------------------


def _session(model: onnx.ModelProto | Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    src = str(model) if isinstance(model, Path) else model.SerializeToString()
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def _top1(model: onnx.ModelProto | Path, x: np.ndarray) -> np.ndarray:
    return np.argmax(_session(model).run(["logits"], {"input": x})[0], axis=-1)


def _prune(model: onnx.ModelProto, share: float) -> onnx.ModelProto:
    damaged = onnx.ModelProto()
    damaged.CopyFrom(model)
    for init in damaged.graph.initializer:
        w = numpy_helper.to_array(init)
        if w.ndim >= 2:
            thr = np.quantile(np.abs(w), share)
            init.CopyFrom(
                numpy_helper.from_array(np.where(np.abs(w) < thr, 0, w).astype(np.float32), init.name)
            )
    return damaged


def recovery() -> bool:
    original = onnx.load(str(SAMPLES / "digits_mlp.onnx"))
    with np.load(SAMPLES / "digits_mlp.npz") as npz:
        x, labels = npz["input"], npz["labels"]
    order = np.random.default_rng(0).permutation(len(x))
    held, train = order[:HELD_OUT], order[HELD_OUT:]
    ref = _top1(original, x[held])
    share, damaged, before = 0.0, original, 1.0
    for share in np.arange(0.50, 0.991, 0.01):
        damaged = _prune(original, float(share))
        before = float(np.mean(_top1(damaged, x[held]) == ref))
        if before <= 0.90:
            break
    print(f"recovery: digits_mlp magnitude-pruned to {share:.0%} of every matrix")
    print(
        f"  top-1 agreement with the original on {HELD_OUT} held-out rows: {before:.1%} (lost {1 - before:.1%})"
    )
    with tempfile.TemporaryDirectory(prefix="bench-distill-") as tmp:
        folder = Path(tmp)
        (folder / "damaged.onnx").write_bytes(damaged.SerializeToString())
        np.savez(folder / "train.npz", input=x[train], labels=labels[train])
        start = time.perf_counter()
        run = run_cli(
            "distill",
            str(folder / "damaged.onnx"),
            "--teacher",
            str(SAMPLES / "digits_mlp.onnx"),
            "--data",
            str(folder / "train.npz"),
            "-o",
            str(folder / "recovered.onnx"),
            "--epochs",
            "30",
            "--lr",
            "2e-3",
            "--no-latency",
            "-q",
            "--json",
        )
        seconds = time.perf_counter() - start
        if run.returncode != 0:
            print(f"  distill failed (exit {run.returncode}): {run.stderr.decode()[-500:]}")
            return False
        after = float(np.mean(_top1(folder / "recovered.onnx", x[held]) == ref))
        recovered_model = onnx.load(str(folder / "recovered.onnx"))
    zeros_kept = all(
        np.array_equal(numpy_helper.to_array(a) == 0, numpy_helper.to_array(b) == 0)
        for a, b in zip(damaged.graph.initializer, recovered_model.graph.initializer, strict=True)
    )
    won_back = (after - before) / (1.0 - before) if before < 1.0 else 1.0
    ok = won_back >= RECOVERY_TARGET
    print(f"  after distill (30 epochs on {len(train)} other rows, {seconds:.1f} s): {after:.1%}")
    print(
        f"  share of lost points recovered: {won_back:.0%} (target >= {RECOVERY_TARGET:.0%}) -> {'met' if ok else 'MISSED'}"
    )
    print(f"  pruned weights still zero after training: {zeros_kept}")
    return ok and zeros_kept


# --- step time -------------------------------------------------------------------------------


def _student(name: str) -> onnx.ModelProto:
    """A sample model, or the detector with H and W pinned as distill pins them to --data's rows."""
    if name != "fpn_detector":
        return onnx.load(str(SAMPLES / f"{name}.onnx"))
    from patterns import fpn_detector

    model = fpn_detector(0)
    for value, side in ((model.graph.input[0], DETECTOR_SIZE), (model.graph.output[0], DETECTOR_SIZE // 4)):
        dims = value.type.tensor_type.shape.dim
        dims[2].dim_value = dims[3].dim_value = side
    return model


def _inputs(name: str) -> dict[str, np.ndarray]:
    if name == "fpn_detector":
        shape = (BATCH[name], 3, DETECTOR_SIZE, DETECTOR_SIZE)
        return {"image": np.random.default_rng(1).random(shape, dtype=np.float32)}
    with np.load(SAMPLES / f"{name}.npz") as npz:
        return {k: npz[k][: BATCH[name]] for k in npz.files if k != "labels"}


def _target(name: str) -> tuple[str, Literal["kl", "mse"], tuple[int, ...]]:
    """The distilled output, the loss distill picks for it (``auto``), and the teacher's shape:
    KL for class scores [N, classes], MSE for the detector's box map [N, 6, H/4, W/4]."""
    if name == "fpn_detector":
        side = DETECTOR_SIZE // 4
        return "boxes", "mse", (BATCH[name], 6, side, side)
    return "logits", "kl", (BATCH[name], 10 if name.startswith("digits") else 4)


def _teacher(name: str) -> np.ndarray:
    return np.random.default_rng(0).standard_normal(_target(name)[2]).astype(np.float32)


def _onnx_step(name: str) -> tuple[Any, dict[str, np.ndarray]]:
    import onnx_ir as ir

    from modelshrink.runtime import RuntimeOptions, Session
    from modelshrink.techniques.distill.optim import OptimizerSpec
    from modelshrink.techniques.distill.step import TargetSpec, build_step, prepare_student

    student = prepare_student(ir.from_proto(_student(name)))
    output, kind, shape = _target(name)
    spec = TargetSpec(outputs=((output, kind, None, ("batch", *shape[1:])),), temperature=TEMPERATURE)
    models = build_step(student, spec, OptimizerSpec(weight_decay=0.0))
    session = Session(models.step.SerializeToString(), RuntimeOptions(threads=1), label="step")
    feed: dict[str, np.ndarray] = {**_inputs(name), models.target_inputs[output]: _teacher(name)}
    feed[models.flat.param] = models.initial_flat()
    feed.update({s: np.zeros_like(feed[models.flat.param]) for s in models.flat.state_in})
    feed[models.lr] = np.asarray(1e-4, np.float32)
    outs = [models.loss, models.flat.param_out, *models.flat.state_out]
    names_in = [models.flat.param, *models.flat.state_in]
    counter = [0]

    def step() -> float:
        counter[0] += 1
        feed[models.step_input] = np.asarray(counter[0], np.float32)
        values = session.run(feed, outs)
        for key, value in zip(names_in, values[1:], strict=True):
            feed[key] = value
        return float(values[0])

    return step, feed


def _torch_step(name: str) -> Any:
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(1)
    model = _student(name)
    raw = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            raw[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    frozen = {
        "attn_scale",
        "const_zero",
        "const_axis1",
        "shape_heads",
        "shape_model",
        "seq_axis",
        "up_scales",
    }
    stats = {k for k in raw if k.endswith((".mean", ".var"))}
    p = {
        k: torch.tensor(
            np.array(v), requires_grad=(k not in frozen and k not in stats and v.dtype == np.float32)
        )
        for k, v in raw.items()
    }
    params = [t for t in p.values() if t.requires_grad]
    x = {k: torch.tensor(v) for k, v in _inputs(name).items()}
    teacher = torch.tensor(_teacher(name))

    def gemm(h: Any, w: str, b: str) -> Any:
        return F.linear(h, p[w], p[b])

    def bn(h: Any, n: str) -> Any:
        return F.batch_norm(
            h, p[f"{n}.mean"], p[f"{n}.var"], p[f"{n}.scale"], p[f"{n}.bias"], False, 0.0, 1e-5
        )

    def forward() -> Any:
        if name == "digits_mlp":
            h = F.relu(gemm(x["input"], "fc1.weight", "fc1.bias"))
            h = F.relu(gemm(h, "fc2.weight", "fc2.bias"))
            return gemm(h, "fc3.weight", "fc3.bias")
        if name == "digits_cnn":
            h = F.max_pool2d(F.relu(bn(F.conv2d(x["image"], p["conv1.weight"], padding=1), "bn1")), 2)
            h = F.max_pool2d(F.relu(bn(F.conv2d(h, p["conv2.weight"], padding=1), "bn2")), 2)
            h = F.relu(h + bn(F.conv2d(h, p["res.weight"], padding=1), "bn_res"))
            h = F.relu(bn(F.conv2d(h, p["conv3.weight"], padding=1), "bn3")).flatten(1)
            return gemm(F.relu(gemm(h, "fc1.weight", "fc1.bias")), "fc2.weight", "fc2.bias")
        if name == "fpn_detector":
            s4 = F.relu(F.conv2d(x["image"], p["c1_w"], stride=2, padding=1))
            s4 = F.relu(F.conv2d(s4, p["c2_w"], stride=2, padding=1))
            s8 = F.relu(F.conv2d(s4, p["c3_w"], stride=2, padding=1))
            up = F.interpolate(s8, scale_factor=2.0, mode="nearest")  # each value copied 2x2
            return F.conv2d(torch.cat([up, s4], 1), p["head_w"], p["head_b"])
        ids = x["input_ids"]
        seq = ids.shape[1]
        h = F.embedding(ids, p["tok_emb.weight"]) + p["pos_emb.weight"][:seq]
        for i in range(2):
            b = f"blocks.{i}"

            def lin(t: Any, n: str, b: str = b) -> Any:
                return t @ p[f"{b}.{n}.weight"] + p[f"{b}.{n}.bias"]

            a = F.layer_norm(h, (64,), p[f"{b}.ln1.weight"], p[f"{b}.ln1.bias"], 1e-5)
            q = lin(a, "attn.q").reshape(-1, seq, 4, 16).transpose(1, 2)
            k = lin(a, "attn.k").reshape(-1, seq, 4, 16).permute(0, 2, 3, 1)
            v = lin(a, "attn.v").reshape(-1, seq, 4, 16).transpose(1, 2)
            ctx = torch.softmax((q @ k) * p["attn_scale"], -1) @ v
            h = h + lin(ctx.transpose(1, 2).reshape(-1, seq, 64), "attn.o")
            f = F.layer_norm(h, (64,), p[f"{b}.ln2.weight"], p[f"{b}.ln2.bias"], 1e-5)
            h = h + lin(F.gelu(lin(f, "ffn.fc1")), "ffn.fc2")
        pooled = F.layer_norm(h, (64,), p["ln_f.weight"], p["ln_f.bias"], 1e-5).mean(1)
        return F.linear(pooled, p["head.weight"], p["head.bias"])

    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    log_t = F.log_softmax(teacher / TEMPERATURE, -1)

    def loss_of(out: Any) -> Any:
        if _target(name)[1] == "mse":
            return F.mse_loss(out, teacher)  # mean over every element, as distill's mse
        s = F.log_softmax(out / TEMPERATURE, -1)
        return F.kl_div(s, log_t, log_target=True, reduction="batchmean") * TEMPERATURE**2

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        loss = loss_of(forward())
        loss.backward()
        opt.step()
        return float(loss.detach())

    return step


def _median_ms(step: Any, runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def step_time() -> bool:
    try:
        import torch
    except ImportError:
        print("step time vs PyTorch: skipped (PyTorch is not installed in this environment; it is never")
        print(f"  a dependency of modelshrink). To run the comparison: {TORCH_HOWTO}")
        return True
    print(
        f"step time vs PyTorch {torch.__version__} (1 thread, forward + loss + backward + AdamW, median ms)"
    )
    ok = True
    for name in STEP_TARGETS:
        ours, _ = _onnx_step(name)
        theirs = _torch_step(name)
        first_ours, first_theirs = ours(), theirs()
        if not math.isclose(first_ours, first_theirs, rel_tol=1e-3):
            print(f"  {name}: first-step loss differs: onnx {first_ours:.6f} vs torch {first_theirs:.6f}")
            ok = False
        for _ in range(5):
            ours()
            theirs()
        a, b = [], []
        for _ in range(5):  # interleaved rounds
            a.append(_median_ms(ours, 20))
            b.append(_median_ms(theirs, 20))
        ma, mb = statistics.median(a), statistics.median(b)
        ratio = ma / mb
        target = STEP_TARGETS[name]
        met = ratio <= target
        ok = ok and met
        print(
            f"  {name:17s} batch {BATCH[name]:3d} ({_target(name)[1]}): onnxruntime {ma:7.2f} ms, PyTorch {mb:7.2f} ms, "
            f"ratio {ratio:.2f}x (target <= {target}x) -> {'met' if met else 'MISSED'}"
        )
    return ok


# --- data larger than memory ------------------------------------------------------------------

IMAGE = (3, 224, 224)
ROW_BYTES = int(np.prod(IMAGE)) * 4
RSS_TARGET = 1.5
FILE_ROWS = 32  # rows per .npz file in the folder-of-files layout


def _image_model(path: Path, *, seed: int, noise: float = 0.0) -> Path:
    """image [N, 3, 224, 224] -> Conv 8x8 stride 8 (16 channels) -> Relu -> GlobalAveragePool
    -> Flatten -> Gemm: logits [N, 10]. Cheap per row, so the data dominates."""
    rng = np.random.default_rng(seed)
    conv = (rng.standard_normal((16, 3, 8, 8)) / np.sqrt(192)).astype(np.float32)
    fc = (rng.standard_normal((10, 16)) / 4).astype(np.float32)
    if noise:
        noisy = np.random.default_rng(seed + 1)
        conv = (conv + noise * noisy.standard_normal(conv.shape) / np.sqrt(192)).astype(np.float32)
        fc = (fc + noise * noisy.standard_normal(fc.shape) / 4).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["image", "conv_w"], ["c"], strides=[8, 8], name="stem"),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["logits"], transB=1, name="head"),
    ]
    graph = helper.make_graph(
        nodes,
        "images",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", *IMAGE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        [
            numpy_helper.from_array(conv, "conv_w"),
            numpy_helper.from_array(fc, "fc_w"),
            numpy_helper.from_array(np.zeros(10, np.float32), "fc_b"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    return path


def _chunks(rows: int, seed: int, size: int = 64) -> Any:
    rng = np.random.default_rng(seed)
    for start in range(0, rows, size):
        yield rng.standard_normal((min(size, rows - start), *IMAGE), dtype=np.float32)


def _write_npy_folder(folder: Path, rows: int) -> None:
    """``folder/image.npy`` of ``rows`` rows, written chunk by chunk (never whole in memory)."""
    folder.mkdir(parents=True)
    with (folder / "image.npy").open("wb") as f:
        header = {"descr": "<f4", "fortran_order": False, "shape": (rows, *IMAGE)}
        np.lib.format.write_array_header_1_0(f, header)
        for chunk in _chunks(rows, 0):
            f.write(chunk.tobytes())


def _write_file_folder(folder: Path, rows: int) -> None:
    """``folder/batchNNNNN.npz``: files of FILE_ROWS rows each."""
    folder.mkdir(parents=True)
    for i, chunk in enumerate(_chunks(rows, 0, FILE_ROWS)):
        np.savez(folder / f"batch{i:05d}.npz", image=chunk)


def _distill_rss(folder: Path, models: Path, data: Path) -> tuple[float, float, int, float]:
    """Peak RSS (MB), seconds, rows and rows/s of one distill run over ``data``."""
    run = run_cli_rss(
        "distill",
        str(models / "student.onnx"),
        "--teacher",
        str(models / "teacher.onnx"),
        "--data",
        str(data),
        "-o",
        str(folder / "out.onnx"),
        "--force",
        "--epochs",
        "1",
        "--batch-size",
        "32",
        "--no-latency",
        "-q",
        "--json",
    )
    if run.returncode != 0:
        raise RuntimeError(f"distill failed (exit {run.returncode}): {run.stderr.decode()[-600:]}")
    rows = int(run.json()["details"]["data"]["rows"])
    return run.peak_rss_mb, run.seconds, rows, rows / run.seconds


def _teacher_modes(models: Path, data: Path, rounds: int = 3) -> dict[str, float]:
    """Seconds of the technique phase (3 epochs) with the teacher cached vs per batch."""
    from modelshrink import api
    from modelshrink.options import RunOptions
    from modelshrink.techniques.distill import DistillConfig, technique

    times: dict[str, list[float]] = {"cached": [], "per batch": []}
    with tempfile.TemporaryDirectory(prefix="bench-distill-") as tmp:
        for _ in range(rounds):
            for mode in times:
                technique._CACHE_TEACHER = mode == "cached"
                report = api.distill(
                    str(models / "student.onnx"),
                    str(Path(tmp) / "out.onnx"),
                    DistillConfig(teacher=str(models / "teacher.onnx"), epochs=3),
                    RunOptions(data=str(data), latency=False, samples=8),
                    force=True,
                )
                times[mode].append(report.timings_s["technique"])
    technique._CACHE_TEACHER = True
    return {mode: statistics.median(values) for mode, values in times.items()}


def data_memory() -> bool:
    """Peak RSS with 100 MB and 4 GB of --data, two layouts; teacher cache vs per batch."""
    big_gb = float(os.environ.get("DATA_GB", "4"))
    sizes = {"100 MB": round(100e6 / ROW_BYTES), f"{big_gb:g} GB": round(big_gb * 1e9 / ROW_BYTES)}
    print(
        f"data larger than memory: distill --epochs 1 on image [N, 3, 224, 224] ({ROW_BYTES / 1e3:.0f} KB "
        "per row), peak RSS of the child (os.wait4)"
    )
    ok = True
    with tempfile.TemporaryDirectory(prefix="bench-distill-data-") as tmp:
        root = Path(tmp)
        models = root / "models"
        models.mkdir()
        _image_model(models / "teacher.onnx", seed=0)
        _image_model(models / "student.onnx", seed=0, noise=0.5)
        layouts = {
            "folder with image.npy (memory-mapped)": _write_npy_folder,
            f"folder of .npz files, {FILE_ROWS} rows each": _write_file_folder,
        }
        for layout, write in layouts.items():
            peaks = {}
            for label, rows in sizes.items():
                data = root / "data"
                write(data, rows)
                peak, seconds, used, rate = _distill_rss(root, models, data)
                if label == "100 MB" and layout.startswith("folder with"):
                    modes = _teacher_modes(models, data)
                peaks[label] = peak
                print(
                    f"  {layout:40s} {label:>6s}: {used:5d} rows, peak RSS {peak:6.0f} MB, "
                    f"{seconds:5.1f} s ({rate:,.0f} rows/s end to end)"
                )
                shutil.rmtree(data)
            small, big = peaks.values()
            ratio = big / small
            met = ratio < RSS_TARGET
            ok = ok and met
            print(f"    ratio {ratio:.2f}x (target < {RSS_TARGET}x) -> {'met' if met else 'MISSED'}")
    faster = min(modes, key=lambda m: modes[m])
    print(
        "  teacher outputs on the 100 MB data, 3 epochs (technique seconds, median of 3 interleaved "
        f"rounds): cached {modes['cached']:.2f} s, per batch {modes['per batch']:.2f} s -> {faster} is faster"
    )
    return ok


def run() -> bool:
    """All three benchmarks; True when every target was met."""
    ok_recovery = recovery()
    print()
    ok_steps = step_time()
    print()
    ok_data = data_memory()
    return ok_recovery and ok_steps and ok_data


if __name__ == "__main__":
    if sys.argv[1:] == ["data"]:
        sys.exit(0 if data_memory() else 1)
    if sys.argv[1:] == ["steps"]:
        sys.exit(0 if step_time() else 1)
    sys.exit(0 if run() else 1)
