"""The slim runtime: estimating and evaluating load neither the training stack nor MONAI, and
model files cannot run code."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from xbmd.errors import InputError
from xbmd.model.bundle import default_model_path, load_bundle

SAMPLES = Path(__file__).resolve().parents[1] / "samples"
TRAINING_STACK = ("lightning", "pytorch_lightning", "tensorboardX", "monai", "ignite")

_PROBE = """
import json, sys
from xbmd.estimation.estimator import Estimator
from xbmd.evaluation.evaluate import evaluate  # noqa: F401
results = Estimator(None).estimate(sys.argv[1])
loaded = sorted({m.split(".")[0] for m in sys.modules})
print(json.dumps({"hips": len(results), "modules": loaded}))
"""


def test_estimate_and_evaluate_import_no_training_stack():
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, str(SAMPLES / "hip_vq0002.dcm")],
        capture_output=True,
        text=True,
        check=True,
    )
    doc = json.loads(out.stdout.strip().splitlines()[-1])
    assert doc["hips"] == 2
    assert not set(TRAINING_STACK) & set(doc["modules"]), doc["modules"]


def test_cli_help_imports_nothing_heavy():
    probe = "import sys, xbmd.cli; print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert not {"torch", "monai", "lightning", "SimpleITK"} & set(out.stdout.split())


class _Payload:
    """An object whose unpickling would run code (``os.system`` here: never called)."""

    def __reduce__(self):
        import os

        return (os.system, ("echo pwned",))


def test_a_model_file_that_would_run_code_is_refused(tmp_path):
    bundle = torch.load(default_model_path(), map_location="cpu", weights_only=True)
    bundle["training"] = {"note": _Payload()}
    path = tmp_path / "evil.pt"
    torch.save(bundle, path)
    with pytest.raises(InputError, match="could run code"):
        load_bundle(path)


def test_bundle_crop_is_checked(tmp_path):
    bundle = torch.load(default_model_path(), map_location="cpu", weights_only=True)
    bundle["crop"] = {"size_px": 256, "pixel_mm": 0.5, "head_position": [0.4, 0.5]}
    path = tmp_path / "other_crop.pt"
    torch.save(bundle, path)
    with pytest.raises(InputError, match="hip crops"):
        load_bundle(path)


def test_the_bundled_model_holds_only_plain_values():
    with default_model_path().open("rb") as fh:
        assert fh.read(2) == b"PK"  # torch's zip format, read with weights_only=True
    assert load_bundle().crop["size_px"] == 256
