"""The five scripts share their skeleton word for word, so `diff flow_grpo.py X.py` shows only the algorithm."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ["awm.py", "mix_grpo.py", "tempflow_grpo.py", "g2rpo.py", "dance_grpo.py", "diffusion_nft.py"]


def shared_parts(script: str) -> tuple[str, str]:
    text = (ROOT / script).read_text()
    args = re.search(r"    # ---- shared by every script.*?\n(.*?)    # ---- ", text, re.S)
    loop = re.search(r"# The loop \(TRY NOT TO MODIFY.*", text, re.S)
    assert args and loop, f"{script}: the shared Args block or the loop marker is missing"
    return args.group(1), loop.group(0)


@pytest.mark.parametrize("script", SCRIPTS)
def test_shared_args_and_loop_are_the_same_text(script):
    base_args, base_loop = shared_parts("flow_grpo.py")
    args, loop = shared_parts(script)
    assert args == base_args, f"{script}: the shared Args fields differ from flow_grpo.py's"
    assert loop == base_loop, f"{script}: check_args / main differ from flow_grpo.py's"
    assert len(base_args.splitlines()) > 60 and "def main(args: Args)" in base_loop
