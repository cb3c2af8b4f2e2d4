"""The README's commands still run as written: every `python SCRIPT ...`, `torchrun ... SCRIPT ...` and
`bash setup.sh JOB` line of its code blocks names a script that exists, and its arguments parse: configs load
with their overrides, flags are known, setup.sh knows the job."""
import re
import shlex

import pytest

from helpers import ROOT


README = (ROOT / "README.md").read_text()
LINES = [ln.split("  #")[0].strip() for block in re.findall(r"```bash\n(.*?)```", README, re.S)
         for ln in block.splitlines() if ln.strip() and not ln.strip().startswith("#")]


def _script_and_args(line):
    words = shlex.split(line)
    if "-m" in words:  # python -m package.module: the module's file
        i = words.index("-m") + 1
        return words[i].replace(".", "/") + ".py", words[i + 1:]
    i = next(k for k, w in enumerate(words) if w.endswith(".py"))
    return words[i], words[i + 1:]


def test_the_readme_has_commands_of_every_kind():
    kinds = {ln.split()[0] for ln in LINES}
    assert {"python", "bash", "torchrun"} <= kinds, LINES
    assert len(README.splitlines()) <= 150


@pytest.mark.parametrize("line", [ln for ln in LINES if ln.startswith(("python ", "torchrun "))])
def test_python_commands_parse(line, in_root):
    from engine import PretrainConfig
    from settings import load_config
    script, args = _script_and_args(line)
    assert (ROOT / script).is_file(), f"{script} does not exist"
    if script == "pretrain.py":
        import pretraining
        parsed, overrides = pretraining.parse_args(args)
        if not parsed.resume:
            load_config(PretrainConfig, parsed.config or pretraining.DEFAULT_CONFIG, overrides)
    elif script == "finetune.py":
        import finetune
        assert finetune.parse_args(args)[0].ckpt
    elif script == "paper_tables.py":
        import paper_tables
        load_config(PretrainConfig, paper_tables.parse_args(args).config)
    elif script == "fedengines/flower_app.py":
        import pretraining
        from fedengines import flower_app
        parsed, overrides = pretraining.parse_args(flower_app.parse_args(args)[1])
        load_config(PretrainConfig, parsed.config, overrides)
    elif script == "deploy.py":
        import deploy
        from fedengines.nodes import load_node_local_config
        if args[0] == "certs":
            assert deploy.parse_certs_args(args[1:]).host
            return
        parsed, overrides = deploy.parse_args(args)
        assert parsed.node_data
        load_node_local_config(parsed.config, overrides)
    elif script in ("scripts/rehearse.py", "scripts/gpu_check.py"):
        import sys
        sys.path.insert(0, str(ROOT / "scripts"))
        mod = __import__(script[8:-3])
        parsed = mod.parse_args(args)
        if script == "scripts/rehearse.py":
            load_config(PretrainConfig, parsed[0].config, parsed[1])
    else:
        pytest.fail(f"no parse check for {script}: add one here")


@pytest.mark.parametrize("line", [ln for ln in LINES if ln.startswith("bash setup.sh")])
def test_setup_jobs_exist(line):
    words = shlex.split(line)
    job = words[2] if len(words) > 2 else "pretrain"
    assert re.search(rf"^\s+{re.escape(job)}\)", (ROOT / "setup.sh").read_text(), re.M), f"setup.sh has no job {job}"
