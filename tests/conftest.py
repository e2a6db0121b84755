import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may download in tests
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_flush_denormal(True)


@pytest.fixture(scope="session")
def tiny_sd3_dir(tmp_path_factory):
    from tiny_sd3 import save_pipeline

    return save_pipeline(tmp_path_factory.mktemp("tiny_sd3"))


@pytest.fixture(scope="session")
def tiny_flux_dir(tmp_path_factory):
    from tiny_flux import save_pipeline

    return save_pipeline(tmp_path_factory.mktemp("tiny_flux"))


@pytest.fixture(scope="session")
def tiny_shapes_policy():
    """The `sd3` policy of a freshly built (random) shapes pipeline: the shipped base's architecture."""
    import shapes
    from common import sd3_policy

    torch.manual_seed(0)
    return sd3_policy(shapes.build_sd3_pipeline(shapes.build_vae(4)), torch.device("cpu"))


@pytest.fixture
def trainable_policy(tiny_shapes_policy):
    """tiny_shapes_policy with every weight trainable (full fine-tuning, frozen reference copy) for one
    test; its weights and frozen state are restored afterwards."""
    policy = tiny_shapes_policy
    saved = {n: p.detach().clone() for n, p in policy.denoiser.state_dict().items()}
    policy.add_lora(0, 0, [])
    yield policy
    policy.denoiser.requires_grad_(False)
    policy.frozen_copy = None
    policy.denoiser.load_state_dict(saved)
