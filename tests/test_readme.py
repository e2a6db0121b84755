"""The real-model commands use flags the scripts have, with values their checks accept. They live in
docs/real_models.md (one per paper and backend) and docs/many_gpus.md (the torchrun ones); the README shows one
of them and points to the rest."""

import importlib
import re
import shlex
from collections import Counter

import pytest
import tyro

from conftest import ROOT

FILES = ("README.md", "docs/real_models.md", "docs/many_gpus.md")
COMMAND = re.compile(r"\n    ((?:python|torchrun --nproc_per_node \d+) (\w+)\.py --model .*?)(?=\n    #|\n\n)", re.S)
COMMANDS = [(cmd, script, name) for name in FILES for cmd, script in COMMAND.findall((ROOT / name).read_text())]
SCRIPTS = {"flow_grpo", "awm", "mix_grpo", "tempflow_grpo", "g2rpo", "dance_grpo", "diffusion_nft"}
MODELS = {"stabilityai/stable-diffusion-3.5-medium", "black-forest-labs/FLUX.1-dev"}


def model_of(command: str) -> str:
    return re.search(r"--model (\S+)", command)[1]


def test_every_script_has_real_model_commands():
    scripts = {script for _, script, _ in COMMANDS}
    assert sum(cmd.startswith("torchrun") for cmd, _, _ in COMMANDS) >= 3  # the many-GPU commands
    assert scripts == SCRIPTS, scripts
    assert {s for cmd, s, _ in COMMANDS if "stable-diffusion-3.5-medium" in cmd} == scripts  # SD3.5-M for each


def test_one_single_gpu_command_per_paper_and_backend():
    found = Counter((s, model_of(cmd)) for cmd, s, name in COMMANDS
                    if name == "docs/real_models.md" and cmd.startswith("python"))
    assert found == Counter({(s, m): 1 for s in SCRIPTS for m in MODELS}), found


def test_the_readme_commands_are_those_of_the_docs():
    """The README shows a command as it stands in docs/real_models.md, and links both command pages."""
    readme = (ROOT / "README.md").read_text()
    shown = [cmd for cmd, _, name in COMMANDS if name == "README.md"]
    assert shown and all(cmd in (ROOT / "docs/real_models.md").read_text() for cmd in shown)
    assert "docs/real_models.md" in readme and "docs/many_gpus.md" in readme


@pytest.mark.parametrize("command,script,source", COMMANDS,
                         ids=[f"{s}-{n.split('/')[-1][:-3]}-{i}" for i, (_, s, n) in enumerate(COMMANDS)])
def test_readme_command_parses(command, script, source):
    words = shlex.split(command.replace("\\\n", " "))
    args = words[words.index(f"{script}.py") + 1:]
    parsed = tyro.cli(importlib.import_module(script).Args, args=args)  # runs Args.__post_init__ checks too
    assert parsed.model == args[args.index("--model") + 1] and parsed.resolution == 512
    if words[0] == "torchrun":  # the global batch splits into whole groups over the processes
        assert parsed.prompts_per_step % int(words[2]) == 0


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_the_algorithm_pages_commands_are_those_of_the_command_pages(script):
    """An algorithm page may repeat a command of docs/real_models.md or docs/many_gpus.md, word for word only."""
    pages = "".join((ROOT / name).read_text() for name in FILES[1:])
    page = [cmd for cmd, _ in COMMAND.findall((ROOT / f"docs/{script}.md").read_text())]
    assert all(cmd in pages for cmd in page), [cmd[:80] for cmd in page if cmd not in pages]
