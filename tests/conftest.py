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
    """A shapes policy over a freshly built (random) UNet and text encoder."""
    import shapes
    from common import shapes_policy

    torch.manual_seed(0)
    tok = shapes.build_tokenizer()
    te = shapes.build_text_encoder(len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    return shapes_policy(shapes.build_unet(), te, tok, torch.device("cpu"))


@pytest.fixture
def trainable_policy(tiny_shapes_policy):
    """tiny_shapes_policy with every weight trainable (full fine-tuning, frozen reference copy) for one
    test; its weights and frozen state are restored afterwards."""
    policy = tiny_shapes_policy
    saved = {n: p.detach().clone() for n, p in policy.denoiser.named_parameters()}
    policy.add_lora(0, 0, [])
    yield policy
    policy.denoiser.requires_grad_(False)
    policy.frozen_copy = None
    policy.denoiser.load_state_dict(saved)
