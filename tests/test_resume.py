"""Resume loses nothing, the short runs train, and bad inputs fail clearly (issue 18), for all five scripts.

Each script runs in-process on the shipped shapes base (what the default run loads), 3 iterations straight and
2 + --resume 1, and the two give bit-identical weights, EMA, optimiser state, algorithm state and metrics (CPU,
one thread). The straight run doubles as the end-to-end training check: rewards vary within groups, the weights
leave the base, and the logged KL is positive where beta > 0. docs/testing.md lists what each test catches."""

import importlib
import json
import shutil

import pytest
import torch

import common

SCRIPTS = ["flow_grpo", "mix_grpo", "awm", "g2rpo", "tempflow_grpo"]
TINY = dict(prompts_per_step=2, group_size=4, num_steps=4, eval_num_steps=3, eval_per_prompt=1, eval_every=1,
            save_every=1, minibatches=2, threads=1, device="cpu", seed=0)
EXTRA = {  # cheaper settings that still exercise each algorithm's state and random draws
    "awm": dict(train_timesteps=2),  # the anchor (state) and stratified timesteps (cpu_gen)
    "mix_grpo": dict(num_steps=6, window_size=2, window_strategy="random"),  # the window: cpu_gen, state["iteration"]
    "g2rpo": dict(granularities=(1, 2)),
    "tempflow_grpo": dict(branch_steps=2),  # 2 of the 3 branchable steps, drawn from gen each iteration
}
TRAIN_PROMPTS = ["a red circle", "a blue square", "a green triangle", "two circles"]
EVAL_PROMPTS = ["a yellow circle", "a red square"]
TIME_KEYS = ("wall_time", "train_time")  # and every "time/..." key: wall-clock, not state


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def prompt_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("prompts")
    (d / "train.txt").write_text("\n".join(TRAIN_PROMPTS) + "\n")
    (d / "eval.txt").write_text("\n".join(EVAL_PROMPTS) + "\n")
    return d / "train.txt", d / "eval.txt"


def _args(name, prompt_files, extra=True, **kw):
    mod = importlib.import_module(name)
    train, evals = prompt_files
    return mod, mod.Args(**{**TINY, **(EXTRA.get(name, {}) if extra else {}), "prompts": str(train),
                            "eval_prompts": str(evals), **kw})


class _Spy:
    """Records the EMA and the (policy, optimiser, state) the loop trains with, by wrapping the names a script
    module uses (and common's, should the loop move there)."""

    def __init__(self, mod, mp):
        self.emas, self.calls = [], []
        spy = self
        for owner in {mod, common}:
            if hasattr(owner, "EMA"):
                base = owner.EMA

                class SpyEMA(base):
                    def __init__(self, *a, **k):
                        super().__init__(*a, **k)
                        spy.emas.append(self)

                mp.setattr(owner, "EMA", SpyEMA)
        train = mod.train_on_batch

        def train_on_batch(policy, opt, batch, adv, state, args, gen):
            spy.calls.append((policy, opt, state))
            return train(policy, opt, batch, adv, state, args, gen)

        mp.setattr(mod, "train_on_batch", train_on_batch)


_RUNS = {}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, prompt_files):
    """name -> dict with the straight 3-iteration run, the 2 + 1 resumed run, its checkpoint after 2 and the spy
    of the resumed run. Each script runs once per session, on demand."""

    def get(name):
        if name not in _RUNS:
            root = tmp_path_factory.mktemp(name)
            mod, args = _args(name, prompt_files, steps=3, out=str(root / "straight"))
            mod.main(args)
            mod, args = _args(name, prompt_files, steps=2, out=str(root / "split"))
            mod.main(args)
            shutil.copy(root / "split" / "checkpoint.pt", root / "after2.pt")
            with pytest.MonkeyPatch.context() as mp:
                spy = _Spy(mod, mp)
                mod, args = _args(name, prompt_files, steps=3, resume=str(root / "split"))
                mod.main(args)
            _RUNS[name] = {"straight": root / "straight", "split": root / "split", "after2": root / "after2.pt",
                           "spy": spy}
        return _RUNS[name]

    return get


def _load(path):
    return torch.load(path if path.suffix == ".pt" else path / "checkpoint.pt", map_location="cpu",
                      weights_only=False)


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _state_free(records):
    return [{k: v for k, v in r.items() if k not in TIME_KEYS and not k.startswith("time/")} for r in records]


def _assert_identical(a, b, where="checkpoint"):
    """Exact (bit-level) equality of nested dicts / lists / tuples of tensors and plain values."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where}: max difference {(a.double() - b.double()).abs().max().item():.3g}"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {set(a) ^ set(b)}"
        for k in a:
            _assert_identical(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _differs(a: dict, b: dict) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------------------------
# Resume: N iterations straight == N - 1 iterations, then --resume for the last one
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", SCRIPTS)
def test_resume_is_bit_identical_to_a_straight_run(runs, name):
    r = runs(name)
    straight, resumed, after2 = _load(r["straight"]), _load(r["split"]), _load(r["after2"])
    assert straight["step"] == resumed["step"] == 3 and after2["step"] == 2
    # the resumed iteration did train (otherwise equality below would prove little about the restore)
    assert _differs(resumed["trainable"], after2["trainable"]), "the resumed iteration must move the weights"
    for key in ("trainable", "ema", "optimizer", "state", "gen", "cpu_gen", "prompt_rng", "samples"):
        _assert_identical(straight[key], resumed[key], key)
    assert _state_free(_records(r["straight"])) == _state_free(_records(r["split"]))


@pytest.mark.parametrize("name", SCRIPTS)
def test_resumed_tensors_are_on_the_policy_device(runs, name):
    """After --resume the EMA shadow and every tensor of the algorithm state sit where the parameters are
    (checkpoints load onto the CPU; on a GPU the first EMA update would otherwise mix devices)."""
    spy = runs(name)["spy"]
    assert spy.emas and spy.calls, "the spies saw the resumed run"
    policy, opt, state = spy.calls[-1]
    ema = spy.emas[-1]
    device = policy.trainable_parameters()[0].device
    assert all(s.device == device for s in ema.shadow)
    assert len(ema.shadow) == len(policy.trainable_parameters())

    def tensors(obj):
        if isinstance(obj, torch.Tensor):
            yield obj
        elif isinstance(obj, dict):
            for v in obj.values():
                yield from tensors(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                yield from tensors(v)

    assert all(t.device == device for t in tensors(state))
    assert all(t.device == device for s in opt.state.values() for t in tensors(s) if t.ndim > 0)


def test_to_device_moves_nested_checkpoint_state():
    """The helper the loop uses to put checkpoint tensors on the policy's device (if the loop has one): nested
    dicts, lists and tuples, other values untouched. The meta device stands in for a GPU on this CPU machine."""
    if not hasattr(common, "to_device"):
        pytest.skip("no to_device helper in common")
    obj = {"anchor": [torch.ones(2), torch.zeros(3)], "updates": 4, "pair": (torch.ones(1), "x"),
           "inner": {"t": torch.arange(3)}, "none": None}
    moved = common.to_device(obj, torch.device("meta"))
    assert moved["anchor"][0].device.type == "meta" and moved["anchor"][1].device.type == "meta"
    assert moved["pair"][0].device.type == "meta" and moved["pair"][1] == "x" and isinstance(moved["pair"], tuple)
    assert moved["inner"]["t"].device.type == "meta" and moved["inner"]["t"].dtype == torch.int64
    assert moved["updates"] == 4 and moved["none"] is None
    assert obj["anchor"][0].device.type == "cpu"  # the input is not modified


# ----------------------------------------------------------------------------------------------
# End-to-end runs that train (the straight run above, on the shipped shapes base)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", SCRIPTS)
def test_short_run_trains(runs, name):
    r = runs(name)
    recs = _records(r["straight"])
    train = [x for x in recs if "reward/mean" in x]
    assert [x["step"] for x in train] == [1, 2, 3]
    assert all(x["adv/abs_mean"] > 0 for x in train), "rewards must vary within groups for the run to train"
    base = common.load_policy(None, torch.device("cpu")).denoiser.state_dict()
    trained = _load(r["straight"])["trainable"]
    assert set(trained) <= set(base), "the shapes default fine-tunes the denoiser's own weights"
    moved = max((trained[k] - base[k]).abs().max().item() for k in trained)
    assert moved > 1e-6, "the weights never left the base"
    beta = importlib.import_module(name).Args().beta
    if beta > 0:
        assert all(x["loss/kl"] > 0 for x in train[1:]), [x["loss/kl"] for x in train]
    else:
        assert all(x["loss/kl"] == 0 for x in train)


# ----------------------------------------------------------------------------------------------
# Bad inputs: a clear SystemExit naming the flag, before the model loads
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def no_model(monkeypatch):
    """Loading the model is an error: every check below must come first."""
    def load_policy(*a, **k):
        raise AssertionError("the model was loaded before the bad input was reported")

    for name in ["common", *SCRIPTS]:
        mod = importlib.import_module(name)
        if hasattr(mod, "load_policy"):
            monkeypatch.setattr(mod, "load_policy", load_policy)


BAD = {
    "mixed_precision": (dict(mixed_precision="bf32"), "--mixed-precision"),
    "minibatches": (dict(minibatches=9), "--minibatches"),  # 2 prompts x 4 images = 8
    "num_steps": (dict(num_steps=1), "--num-steps"),
}


@pytest.mark.parametrize("case", list(BAD))
@pytest.mark.parametrize("name", SCRIPTS)
def test_bad_flag_fails_before_loading(no_model, prompt_files, tmp_path, name, case):
    kw, flag = BAD[case]
    with pytest.raises(SystemExit) as e:
        mod, args = _args(name, prompt_files, extra=False, steps=1, out=str(tmp_path / "r"), **kw)
        mod.main(args)
    assert flag in str(e.value), str(e.value)


@pytest.mark.parametrize("which", ["empty", "missing"])
@pytest.mark.parametrize("flag", ["prompts", "eval_prompts"])
@pytest.mark.parametrize("name", SCRIPTS)
def test_bad_prompts_file_fails_before_loading(no_model, prompt_files, tmp_path, name, flag, which):
    path = tmp_path / "prompts.txt"
    if which == "empty":
        path.write_text("\n  \n")
    with pytest.raises(SystemExit) as e:
        mod, args = _args(name, prompt_files, steps=1, out=str(tmp_path / "r"), **{flag: str(path)})
        mod.main(args)
    msg = str(e.value)
    assert str(path) in msg and "prompts" in msg, msg


@pytest.mark.parametrize("change,flag", [(dict(lora_rank=4, lora_alpha=8.0), "--lora-rank"),
                                         (dict(model="/nonexistent/other-model"), "--model")])
@pytest.mark.parametrize("name", SCRIPTS)
def test_resume_with_other_model_settings_fails_before_loading(runs, no_model, prompt_files, name, change, flag):
    """The run was saved with the shapes base, every weight trainable (--lora-rank 0)."""
    run_dir = runs(name)["straight"]
    before = (run_dir / "metrics.jsonl").read_text()
    with pytest.raises(SystemExit) as e:
        mod, args = _args(name, prompt_files, steps=4, resume=str(run_dir), **change)
        mod.main(args)
    assert flag in str(e.value), str(e.value)
    assert (run_dir / "metrics.jsonl").read_text() == before, "a refused resume must not touch the run"


def test_resume_of_a_lora_run_without_lora_flags(prompt_files, tmp_path):
    """A LoRA run resumed without --lora-rank either continues as LoRA or stops with a clear SystemExit naming
    --lora-rank; it must not load the checkpoint into a full fine-tuning policy and fail with a traceback."""
    import flow_grpo

    out = tmp_path / "lora"
    small = dict(steps=1, prompts_per_step=1, group_size=2, num_steps=2, minibatches=1, lora_rank=2, lora_alpha=4.0,
                 out=str(out))
    mod, args = _args("flow_grpo", prompt_files, **small)
    mod.main(args)
    mod, args = _args("flow_grpo", prompt_files, **{**small, "out": None, "lora_rank": None, "lora_alpha": None,
                                                    "resume": str(out)})
    try:
        flow_grpo.main(args)
    except SystemExit as e:
        assert "--lora-rank" in str(e), str(e)
    else:
        assert args.lora_rank == 2, "the resumed run continues with the saved LoRA"
