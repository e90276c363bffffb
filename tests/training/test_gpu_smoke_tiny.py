"""``benchmarks/gpu_smoke.py --tiny``: the paper path (published layouts → model_from_config →
Trainer, both stages, checkpoint and resume, inference) on the CPU at small widths."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
from gpu_smoke import motion_module_shapes  # noqa: E402


def test_gpu_smoke_tiny_runs_every_phase(tmp_path) -> None:
    rows_path = tmp_path / "rows.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_smoke.py"), "--tiny",
         "--out", str(tmp_path / "w"), "--json", str(rows_path)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    listed = json.loads(rows_path.read_text())
    assert [r["status"] for r in listed] == ["ok"] * 6, listed
    written, stage1, stage2, resume, inference, offloaded = listed
    rows = {"stage 1": stage1, "stage 2": stage2, "inference": inference}
    assert rows["stage 1"]["motion_module_loaded"] is False
    assert rows["stage 1"]["finite"] and rows["stage 2"]["finite"]
    # Stage 2 trains the published motion module's parameters and nothing else.
    shapes = motion_module_shapes(tiny=True)
    expected = sum(torch.Size(s).numel() for k, s in shapes.items() if not k.endswith(".pe"))
    assert rows["stage 2"]["trainable_M"] == round(expected / 1e6, 1)
    assert resume["weights_restored"] and resume["optimizer_state_on_device"]
    assert resume["resumed_at_step"] == 2
    assert rows["inference"]["output"] == [4, 64, 64, 3]
    assert offloaded["same_frames_as_placed"] and offloaded["output"] == [4, 64, 64, 3]
    # The checkpoint holds what stage 2 changes, not the frozen U-Nets, VAE and CLIP.
    ckpt = tmp_path / "w" / "checkpoint" / "model.safetensors"
    from safetensors import safe_open

    with safe_open(str(ckpt), "pt") as f:
        names = list(f.keys())
    assert names and all(n.startswith("temporal.") for n in names)
