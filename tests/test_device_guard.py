"""Device discipline without a GPU (issue 20).

1. A static check over the device code (saev_core/model, saev_core/sae, the pipeline's stages):
   every tensor constructor names its device (`device=`), or carries a `# host` comment (on its
   line or the line above) saying why it belongs on the host. It fails on the content_mask of cd3cdc8, whose `markup` tensor was
   built on the CPU and compared with the ids on the model's device.
2. The adapter's content and modality masks under FakeTensorMode with fake CUDA ids: mixing a
   CPU tensor into a CUDA computation raises there (torch checks devices as it would on a GPU).

What they cannot catch: a constructor with an explicit wrong device, a tensor moved to the host
by `.cpu()` inside a device loop, ops whose output shape depends on the data (FakeTensorMode
cannot run `nonzero`, boolean indexing, `.tolist()`), and anything outside the scanned folders.
"""

import ast
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCANNED = [ROOT / "saev_core" / "model", ROOT / "saev_core" / "sae", ROOT / "saev_core" / "pipeline" / "stages.py",
           ROOT / "saev_core" / "pipeline" / "score_stages.py"]
CONSTRUCTORS = {"tensor", "as_tensor", "zeros", "ones", "empty", "full", "arange", "rand", "randn", "randint",
                "randperm", "eye", "linspace"}


def device_free_constructors(source: str) -> list[tuple[int, str]]:
    """(line, call) of torch constructors with no `device=` and no `# host` comment on their line."""
    lines = source.splitlines()
    found = []
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"
                and node.func.attr in CONSTRUCTORS):
            continue
        if any(k.arg == "device" for k in node.keywords):
            continue
        end = getattr(node, "end_lineno", node.lineno)
        above = lines[node.lineno - 2].strip() if node.lineno > 1 else ""
        if above.startswith("# host") or any("# host" in lines[i - 1] for i in range(node.lineno, end + 1)):
            continue
        found.append((node.lineno, ast.unparse(node)[:80]))
    return found


def _files():
    for p in SCANNED:
        yield from ([p] if p.is_file() else sorted(p.rglob("*.py")))


def test_every_tensor_constructor_in_device_code_names_its_device():
    bad = [f"{f.relative_to(ROOT)}:{line}: {call}" for f in _files() for line, call in
           device_free_constructors(f.read_text())]
    assert not bad, "tensor constructors without device= (add it, or a '# host: why' comment):\n" + "\n".join(bad)


def test_the_static_check_catches_the_old_content_mask():
    old = '''
def content_mask(self, input_ids, with_response=False):
    markup = torch.tensor(self._markup() + [self.image_token_id], dtype=input_ids.dtype)
    mask = torch.zeros(input_ids.shape[0], dtype=torch.bool)
    ok = torch.zeros(3, device=input_ids.device)
    host = torch.zeros(3)  # host: a small table read on the CPU
    return mask
'''
    assert [line for line, _ in device_free_constructors(old)] == [3, 4]


def _adapter():
    from saev_core.model.mllm import MLLMAdapter
    from saev_core.toyworld import toy_model_path

    return MLLMAdapter.from_pretrained(str(toy_model_path()), layer=2, device="cpu")


def test_content_mask_builds_its_tensors_on_the_ids_device():
    """Under FakeTensorMode a CPU tensor meeting fake CUDA ids raises a device mismatch, as a real
    GPU would; the mask comes back on the ids' device. (The data-dependent steps - nonzero,
    tolist - cannot run under the mode, so the check stops at the first one; what runs before it
    is the part that crashed on CUDA.)"""
    from torch._subclasses.fake_tensor import FakeTensorMode, UnsupportedFakeTensorException
    from torch._subclasses.fake_tensor import DataDependentOutputException

    adapter = _adapter()
    ids = adapter.build_inputs([_image()], ["what colour is the circle ?"]).host_ids[0]
    adapter._markup(), adapter._template(False)  # host-side tables, built before the mode
    with FakeTensorMode(allow_non_fake_inputs=True):
        cuda_ids = torch.empty(ids.shape, dtype=ids.dtype, device="cuda")
        try:
            mask = adapter.content_mask(cuda_ids)
        except (DataDependentOutputException, UnsupportedFakeTensorException, RuntimeError) as exc:
            # the data-dependent step: fine; a device mismatch is the failure this test looks for
            assert "device" not in str(exc).lower() or "cuda devices" in str(exc).lower(), exc
        else:
            assert mask.device.type == "cuda"


def test_the_fake_mode_catches_a_cpu_tensor_in_a_cuda_computation():
    """The check above can fail: the same mode raises on the old code's first step."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        cuda_ids = torch.empty(12, dtype=torch.long, device="cuda")
        with pytest.raises(Exception, match="(?i)device"):
            torch.isin(cuda_ids, torch.tensor([1, 2], dtype=torch.long))


def _image():
    from PIL import Image

    return Image.new("RGB", (32, 32), (200, 30, 30))
