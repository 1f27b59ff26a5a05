"""Resume on another layout (stages x replicas) with the optimizer state: the per-parameter re-mapping, ZeRO
partitions gathered and re-split, the global batch kept by the derived accumulation, and real resumes that continue
the uninterrupted run's losses."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
import torch
from deepspeed.utils.tensor_fragment import fragment_address

from lavis.data.datasets import StepSampler
from lavis.engine.optim import build_optimizer
from lavis.engine.relayout import (
    MASTER_KEY,
    RelayoutError,
    describe,
    fill_partition,
    gather_partitions,
    overlapping_stages,
    state_dict_for,
    states_by_name,
)
from lavis.engine.run_dir import RunDirError, config_changes, resume_grad_accum

from .conftest import COMMON, DEMO_CFG, data_options, launch, losses

# --- unpartitioned optimizers: whole per-parameter entries move with their parameter ----------------------------


def _params(seed: int) -> dict[str, torch.nn.Parameter]:
    """Three named parameters of the sizes bitsandbytes quantizes (>= 4096 values) plus a small 1-D one."""
    gen = torch.Generator().manual_seed(seed)
    shapes = {"0.a.weight": (64, 128), "1.b.weight": (96, 64), "1.b.bias": (96,), "2.c.weight": (64, 80)}
    return {n: torch.nn.Parameter(torch.randn(*s, generator=gen)) for n, s in shapes.items()}


def _grads(params: dict[str, torch.nn.Parameter], i: int) -> None:
    for k, p in enumerate(params.values()):
        p.grad = torch.cos(p.detach().float() * (i + 1) + k).to(p.dtype)


def _groups(names: list[str], params: dict[str, torch.nn.Parameter]) -> list[list[str]]:
    """Groups as lavis.engine.optim.param_groups forms them: >= 2-D weights, then 1-D ones (empty ones left out)."""
    return [g for g in ([n for n in names if params[n].ndim >= 2], [n for n in names if params[n].ndim < 2]) if g]


@pytest.mark.parametrize("kind", ["adamw", "adamw8bit", "adamw_bf16"])
def test_optimizer_state_moves_with_its_parameter_to_another_stage(kind: str) -> None:
    """Two old stages ({a, b.weight}, {b.bias, c}) step three times; their state, named per parameter, is loaded
    into two new stages ({a}, {b.weight, b.bias, c}) holding copies of the weights; both layouts then step on alike
    to the same bits (8-bit moments and Kahan compensation included)."""
    dtype = torch.bfloat16 if kind == "adamw_bf16" else torch.float32
    old = {n: torch.nn.Parameter(p.detach().to(dtype)) for n, p in _params(0).items()}
    kw = {"clip": 0.0, "norm_group": None, "lr": 1e-2, "weight_decay": 0.05}

    def build(names: list[str], params: dict[str, torch.nn.Parameter]) -> tuple[torch.optim.Optimizer, list]:
        groups = _groups(names, params)
        return build_optimizer(kind, [{"params": [params[n] for n in g]} for g in groups], **kw), groups

    old_stages = [build(["0.a.weight", "1.b.weight"], old), build(["1.b.bias", "2.c.weight"], old)]
    for i in range(3):
        _grads(old, i)
        for opt, _ in old_stages:
            opt.step()
    saved = {}
    for opt, groups in old_stages:
        saved.update(states_by_name(copy.deepcopy(opt.state_dict()), groups, "test"))
    if kind == "adamw8bit":
        quant = saved["0.a.weight"]["__bnb_optimizer_quant_state__"]
        assert quant["state1"].dtype == torch.uint8 and quant["absmax1"].numel() > 1  # per-parameter blocks
    if kind == "adamw_bf16":
        assert saved["2.c.weight"]["comp"].abs().max() > 0  # Kahan compensation carried

    new = {n: torch.nn.Parameter(p.detach().clone()) for n, p in old.items()}
    new_stages = [build(["0.a.weight"], new), build(["1.b.weight", "1.b.bias", "2.c.weight"], new)]
    for opt, groups in new_stages:
        opt.load_state_dict(state_dict_for(opt.state_dict(), groups, saved))
    for i in range(3, 6):
        _grads(old, i)
        _grads(new, i)
        for opt, _ in old_stages + new_stages:
            opt.step()
    for n in old:
        assert torch.equal(old[n], new[n]), n


def test_state_for_a_parameter_the_checkpoint_lacks_is_refused() -> None:
    p = _params(0)
    opt = build_optimizer("adamw", [{"params": [p["0.a.weight"], p["2.c.weight"]]}], clip=0.0, norm_group=None,
                          lr=1e-3)
    saved = {"0.a.weight": {"step": torch.tensor(3.0), "exp_avg": torch.zeros(64, 128),
                            "exp_avg_sq": torch.zeros(64, 128)}}
    with pytest.raises(RelayoutError, match="no optimizer state for 1 trained parameter.*first: 2.c.weight"):
        state_dict_for(opt.state_dict(), [["0.a.weight", "2.c.weight"]], saved)
    with pytest.raises(RelayoutError, match="groups hold \\[2\\] parameters but lavis_meta.json optimizer_params"):
        states_by_name({"state": {}, "param_groups": [{"params": [0, 1]}]}, [["0.a.weight"]], "mp_rank_00")


# --- partitioned optimizers: gathered over the old replicas, re-split for the new ones ---------------------------


def _zero_layout(numels: dict[str, int], dp: int, align: int = 4) -> tuple[int, list[list[tuple[str, int, int, int]]]]:
    """How ZeRO-1 cuts a group: the parameters flat one after another, padded to a multiple of ``dp * align``,
    split into ``dp`` equal partitions. Returns (partition size, per replica: (name, start in the parameter, start
    in the partition, numel))."""
    total = sum(numels.values())
    size = -(-total // (dp * align)) * align
    frags: list[list[tuple[str, int, int, int]]] = [[] for _ in range(dp)]
    offset = 0
    for name, n in numels.items():
        for d in range(dp):
            lo, hi = max(offset, d * size), min(offset + n, (d + 1) * size)
            if lo < hi:
                frags[d].append((name, lo - offset, lo - d * size, hi - lo))
        offset += n
    return size, frags


def _zero_files(full: dict[str, dict[str, torch.Tensor]], dp: int) -> list[dict]:
    """The ``optimizer_state_dict`` of each replica's ``zero_pp_rank_d`` file for one group holding ``full``."""
    size, frags = _zero_layout({n: v[MASTER_KEY].numel() for n, v in full.items()}, dp)
    files = []
    for d in range(dp):
        flat = {k: torch.zeros(size) for k in (MASTER_KEY, "exp_avg", "exp_avg_sq")}
        for name, lp, hp, n in frags[d]:
            for k in flat:
                flat[k][hp:hp + n] = full[name][k][lp:lp + n]
        moments = {"step": torch.tensor(3.0), "exp_avg": flat["exp_avg"], "exp_avg_sq": flat["exp_avg_sq"]}
        files.append({
            "base_optimizer_state": {"state": {0: moments}, "param_groups": [{"params": [0]}]},
            "single_partition_of_fp32_groups": [flat[MASTER_KEY]],
            "param_slice_mappings": [{name: fragment_address(numel=n, start=hp) for name, _, hp, n in frags[d]}],
        })
    return files


@pytest.mark.parametrize("old_dp, new_dp", [(1, 2), (2, 1), (2, 3), (3, 2)])
def test_zero_partitions_are_gathered_and_resplit_exactly(old_dp: int, new_dp: int) -> None:
    gen = torch.Generator().manual_seed(1)
    numels = {"3.x.weight": 37, "3.x.bias": 5, "4.y.weight": 64, "4.y.bias": 3}
    full = {n: {k: torch.randn(m, generator=gen) for k in (MASTER_KEY, "exp_avg", "exp_avg_sq")}
            for n, m in numels.items()}
    gathered = gather_partitions(_zero_files(full, old_dp))
    assert set(gathered) == set(full)
    for name, entry in gathered.items():
        assert float(entry["step"]) == 3.0
        for k, v in full[name].items():
            assert torch.equal(entry[k], v), (name, k)
    size, frags = _zero_layout(numels, new_dp)
    expected = _zero_files(full, new_dp)
    for d in range(new_dp):
        flat, state = torch.zeros(size), {}
        fill_partition(flat, state, frags[d], gathered)
        assert torch.equal(flat, expected[d]["single_partition_of_fp32_groups"][0])
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(state[k], expected[d]["base_optimizer_state"]["state"][0][k])
        assert float(state["step"]) == 3.0


def test_quantized_moments_under_zero_are_refused() -> None:
    part = _zero_files({"0.w": {k: torch.ones(8) for k in (MASTER_KEY, "exp_avg", "exp_avg_sq")}}, 1)[0]
    part["base_optimizer_state"]["state"][0]["state1"] = torch.zeros(8, dtype=torch.uint8)
    with pytest.raises(RelayoutError, match="'state1' \\(torch.uint8 tensor\\).*resume on the checkpoint's layout"):
        gather_partitions([part], "zero_pp_rank_0_mp_rank_00_optim_states.pt")


def test_layout_helpers() -> None:
    assert overlapping_stages([0, 1, 5], 0, 1) == [0]
    assert overlapping_stages([0, 1, 5], 1, 2) == [1]
    assert overlapping_stages([0, 2, 5], 1, 3) == [0, 1]
    assert overlapping_stages([0, 1, 5], 0, 5) == [0, 1]
    assert describe([0, 1, 5], 1) == "2 stages x 1 replica"
    assert describe([0, 5], 2) == "1 stage x 2 replicas"


# --- the global batch and the micro-batches of a step ------------------------------------------------------------


def test_grad_accum_is_derived_to_keep_the_global_batch(tmp_path: Path) -> None:
    saved = {"micro_batch_size": 4, "grad_accum_steps": 2}
    assert resume_grad_accum(saved, 1, 4, 2, 2, tmp_path) == 1  # the checkpoint's value: replaced
    assert resume_grad_accum(saved, 1, 4, 1, 2, tmp_path) == 1  # the derived value, named explicitly
    assert resume_grad_accum(saved, 2, 4, 2, 1, tmp_path) == 4
    assert resume_grad_accum(saved, 1, 4, 2, 1, tmp_path) == 2
    gas = "train.batch.grad_accum_steps"
    with pytest.raises(RunDirError, match=f"{gas}=3 on 1 replica.*leave {gas} at 2"):
        resume_grad_accum(saved, 1, 4, 3, 1, tmp_path)  # another global batch on the same layout
    six = {"micro_batch_size": 2, "grad_accum_steps": 3}
    with pytest.raises(RunDirError) as e:
        resume_grad_accum(six, 1, 2, 3, 4, tmp_path)  # global 6 on 4 replicas
    msg = str(e.value)
    assert "\n" not in msg and "train.batch.micro_batch_size x train.batch.grad_accum_steps x replicas" in msg
    assert "2 x 3 x 1 = 6" in msg and "do not split into micro-batches of 2 on 4 replicas" in msg
    assert "divides 3" in msg


def test_accumulation_change_is_applied_not_refused_once_derived() -> None:
    saved = {"train": {"batch": {"grad_accum_steps": 2, "micro_batch_size": 4}, "parallel": {"num_stages": 2}}}
    new = {"train": {"batch": {"grad_accum_steps": 1, "micro_batch_size": 4}, "parallel": {"num_stages": 1}}}
    ch = config_changes(saved, new, defaults={})
    assert ch.refused == []
    assert ch.applied[0].startswith("train.batch.grad_accum_steps: 2 -> 1 (derived")


@pytest.mark.parametrize("grouped", [False, True])
def test_micro_batches_of_a_step_do_not_depend_on_the_layout(grouped: bool) -> None:
    """A step's global batch is cut into micro-batches ``c = micro * D + replica``: the same micro-batches (same
    samples, augmentation seeds and order inside) for every (accumulation, replicas) with the same product. Each
    micro-batch's loss is its own token mean and the step's loss the mean over micro-batches (DeepSpeed divides by
    the accumulation and averages over replicas), so the loss and gradient of a step average the same terms."""
    lengths = torch.randint(10, 500, (120,), generator=torch.Generator().manual_seed(0)).tolist()
    length_of = (lambda i: lengths[i]) if grouped else None

    def chunks(gas: int, dp: int, step: int) -> list[list]:
        s = StepSampler([120], [1.0], seed=7, micro_batch_size=4, grad_accum_steps=gas, dp_rank=0, dp_size=dp,
                        length_of=length_of)
        keys = s.step_keys(step)
        return [keys[c // dp][c % dp] for c in range(gas * dp)]

    for step in (0, 3, 31):  # step 31 crosses an epoch boundary
        ref = chunks(6, 1, step)
        assert chunks(3, 2, step) == chunks(2, 3, step) == chunks(1, 6, step) == ref
        assert len({k for c in ref for k in c}) == 24


# --- real resumes on another layout ------------------------------------------------------------------------------

SETTINGS = {"adamw": (), "zero1": ("train.optim.zero_stage=1",), "adamw8bit": ("train.optim.optimizer=adamw8bit",)}
LAYOUTS = {"3x1": (3, 3), "1x2": (2, 1)}  # (processes, stages)


def _args(out: Path, data: Path, stages: int, extra: tuple[str, ...]) -> list[str]:
    return ["--cfg-path", str(DEMO_CFG), "--num-stages", str(stages), "--max-steps", "6", "--output-dir", str(out),
            "--options", *COMMON, "train.batch.grad_accum_steps=2", "train.checkpoint.save_every=3",
            *data_options(data), *extra]


@pytest.fixture(scope="module")
def references(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Per optimizer setting, lazily: one uninterrupted 6-step run with 2 stages x 1 replica (checkpoints at 3 and
    6)."""
    tmp = tmp_path_factory.mktemp("relayout")

    class Runs(dict):
        def __missing__(self, setting: str) -> Path:
            out = tmp / f"ref_{setting}"
            launch(2, _args(out, tiny_data, 2, SETTINGS[setting]))
            self[setting] = out
            return out

    return Runs()


def _stopped_at_3(ref: Path, dst: Path) -> Path:
    """The reference run as a run stopped at step 3 would have left it (``latest`` names global_step3)."""
    out = Path(shutil.copytree(ref, dst))
    shutil.rmtree(out / "global_step6")
    (out / "latest").write_text("global_step3")
    return out


@pytest.mark.process
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_resume_on_another_layout_continues_the_uninterrupted_run(
        setting: str, layout: str, references: dict[str, Path], tiny_data: Path, tmp_path: Path) -> None:
    ref = references[setting]
    out = _stopped_at_3(ref, tmp_path / "run")
    nproc, stages = LAYOUTS[layout]
    proc = launch(nproc, [*_args(out, tiny_data, stages, SETTINGS[setting]), "--resume"])
    log = proc.stdout + proc.stderr
    new = describe([0] * (stages + 1), nproc // stages)
    assert (f"resuming global_step3 written with 2 stages x 1 replica on {new}; optimizer state re-mapped per "
            "parameter") in log, log[-3000:]
    if layout == "1x2":
        assert "train.batch.grad_accum_steps: 2 -> 1 (derived" in log
    full, resumed = losses(ref), losses(out)
    assert len(full) == len(resumed) == 6
    for a, b in zip(full[3:], resumed[3:]):
        assert abs(a - b) <= 1e-5 * abs(a), (setting, layout, full, resumed)


@pytest.mark.process
def test_a_global_batch_the_new_layout_cannot_split_is_refused(references: dict[str, Path], tiny_data: Path,
                                                              tmp_path: Path) -> None:
    """Global batch 4 x 2 x 1 = 8 on 3 replicas: one error line naming the keys, exit 1, nothing written."""
    out = _stopped_at_3(references["adamw"], tmp_path / "run")
    before = sorted(p.name for p in out.iterdir())
    proc = launch(3, [*_args(out, tiny_data, 1, ()), "--resume"], check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.startswith("error:")]
    assert errors and "train.batch.micro_batch_size x train.batch.grad_accum_steps x replicas" in errors[0], errors
    assert "4 x 2 x 1 = 8" in errors[0] and "on 3 replicas" in errors[0]
    assert sorted(p.name for p in out.iterdir()) == before
