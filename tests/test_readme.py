"""The README's commands for real models use flags the scripts have, with values their checks accept."""

import importlib
import re
import shlex

import pytest
import tyro

from conftest import ROOT

COMMANDS = re.findall(r"\n    ((?:python|torchrun --nproc_per_node \d+) (\w+)\.py --model .*?)(?=\n    #|\n\n)",
                      (ROOT / "README.md").read_text(), re.S)


def test_every_script_has_real_model_commands():
    scripts = {script for _, script in COMMANDS}
    assert sum(cmd.startswith("torchrun") for cmd, _ in COMMANDS) >= 3  # the many-GPU commands
    assert scripts == {"flow_grpo", "awm", "mix_grpo", "tempflow_grpo", "g2rpo"}, scripts
    assert {s for cmd, s in COMMANDS if "stable-diffusion-3.5-medium" in cmd} == scripts  # SD3.5-M for each


@pytest.mark.parametrize("command,script", COMMANDS, ids=[f"{s}-{i}" for i, (_, s) in enumerate(COMMANDS)])
def test_readme_command_parses(command, script):
    words = shlex.split(command.replace("\\\n", " "))
    args = words[words.index(f"{script}.py") + 1:]
    parsed = tyro.cli(importlib.import_module(script).Args, args=args)  # runs Args.__post_init__ checks too
    assert parsed.model == args[args.index("--model") + 1] and parsed.resolution == 512
    if words[0] == "torchrun":  # the global batch splits into whole groups over the processes
        assert parsed.prompts_per_step % int(words[2]) == 0
