"""The training loop: one step, tree vs flat parameters, Adam as Lux's, the epoch line, a full run."""

import math
import re

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from odeflux.mnist.config import TrainConfig, build_model
from odeflux.mnist.data import load_mnist
from odeflux.mnist.devices import DeterminismError, DeviceError, resolve_device
from odeflux.mnist.killhook import KillHook
from odeflux.mnist.model import create_model, trainable_parameters
from odeflux.mnist.optim import make_optimizer
from odeflux.mnist.results import EpochResult
from odeflux.mnist.schedule import CosineLR
from odeflux.mnist.steps import accuracy, train_step, warmup
from odeflux.mnist.train import train

LINE = re.compile(r"^\[(\d+)/(\d+)\] \t Time \d+\.\d\ds \t Training Accuracy: \d+\.\d\d% \t Test Accuracy: \d+\.\d\d%$")


@pytest.fixture(scope="module")
def images():
    x, y = load_mnist("train", n=256)
    return x, y


def _flat_grad(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in trainable_parameters(model)])


def _flat_values(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in trainable_parameters(model)])


@pytest.mark.parametrize("sensealg", ["direct", "interpolating", "gauss"])
def test_tree_and_flat_take_the_same_step(images, sensealg):
    x, y = images[0][:128], images[1][:128]
    results = {}
    for params in ("tree", "flat"):
        model = create_model(sensealg=sensealg, params=params)
        opt = make_optimizer(model)
        loss = train_step(model, (x, y), opt, F.cross_entropy)
        results[params] = (loss, _flat_grad(model), _flat_values(model))
    (loss_t, g_t, p_t), (loss_f, g_f, p_f) = results["tree"], results["flat"]
    torch.testing.assert_close(loss_f, loss_t, rtol=1e-6, atol=0)
    # Every layer gets a gradient, the ODE's included (a lost one would read as zeros).
    ode = slice(784 * 20 + 20, 784 * 20 + 20 + 540)
    assert g_t[ode].abs().max() > 1e-4
    torch.testing.assert_close(g_f, g_t, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(p_f, p_t, rtol=1e-6, atol=1e-7)


def test_adam_is_luxs(images):
    """One step against Optimisers.jl's Adam written out: m, v, bias corrections, eps outside the sqrt."""
    model = create_model(sensealg="direct", params="flat")
    opt = make_optimizer(model, lr=1e-3)
    group = opt.param_groups[0]
    assert group["betas"] == (0.9, 0.999) and group["eps"] == 1e-8 and group["lr"] == 1e-3
    before = model.flat.detach().clone()
    train_step(model, (images[0][:32], images[1][:32]), opt, F.cross_entropy)
    g = model.flat.grad
    b1, b2, eps, lr = 0.9, 0.999, 1e-8, 1e-3
    m = (1 - b1) * g
    v = (1 - b2) * g * g
    expected = before - lr * (m / (1 - b1)) / (torch.sqrt(v / (1 - b2)) + eps)
    torch.testing.assert_close(model.flat.detach(), expected, rtol=1e-6, atol=1e-8)


def test_a_few_steps_lower_the_loss(images):
    x, y = images
    model = create_model(sensealg="direct", params="flat")
    opt = make_optimizer(model, lr=1e-2)
    batches = [(x[:128], y[:128]), (x[128:], y[128:])]
    with torch.no_grad():
        before = sum(F.cross_entropy(model(bx), by) for bx, by in batches) / 2
    for _ in range(8):
        for b in batches:
            train_step(model, b, opt, F.cross_entropy)
    with torch.no_grad():
        after = sum(F.cross_entropy(model(bx), by) for bx, by in batches) / 2
    assert after < 0.7 * before


def test_warmup_leaves_weights_and_grads_alone(images):
    model = create_model(sensealg="direct", params="tree")
    before = _flat_values(model).clone()
    warmup(model, images)
    assert torch.equal(_flat_values(model), before)
    assert all(p.grad is None for p in model.parameters())


def test_accuracy_counts_argmax_hits():
    model = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(2))  # predicts the larger coordinate
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 1.0], [0.0, 3.0], [5.0, 4.0]])
    y = torch.tensor([0, 1, 1, 1, 0])  # the third is wrong
    loader = [(x[:2], y[:2]), (x[2:], y[2:])]
    model.train()
    assert accuracy(model, loader) == pytest.approx(4 / 5)
    assert model.training  # mode restored


def test_epoch_line_is_the_tutorials_format():
    line = EpochResult(1, 0.314, 0.87407, 0.84, 0.5).line(9)
    assert line == "[1/9] \t Time 0.31s \t Training Accuracy: 87.41% \t Test Accuracy: 84.00%"
    assert LINE.match(line)


def test_short_run_logs_and_learns(images):
    x, y = images
    lines: list[str] = []
    config = TrainConfig(sensealg="direct", device="cpu", epochs=3, batch_size=64, lr=3e-3)
    res = train(config, log=lines.append, data=((x[:192], y[:192]), (x[192:], y[192:])))
    assert (res.n_train, res.n_test) == (192, 64)
    assert [e.epoch for e in res.epochs] == [1, 2, 3]
    assert all(LINE.match(l) for l in lines) and len(lines) == 3
    assert res.epochs[-1].mean_loss < res.epochs[0].mean_loss
    assert all(0.0 <= e.train_accuracy <= 1.0 and 0.0 <= e.test_accuracy <= 1.0 for e in res.epochs)


def test_run_restores_the_thread_count(images):
    x, y = images
    before = torch.get_num_threads()
    config = TrainConfig(sensealg="direct", device="cpu", epochs=1, threads=1)
    train(config, log=None, data=((x[:64], y[:64]), (x[64:96], y[64:96])))
    assert torch.get_num_threads() == before


def test_devices():
    assert resolve_device("cpu") == torch.device("cpu")
    if torch.cuda.is_available():
        assert resolve_device("auto").type == "cuda"
    else:
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(DeviceError, match="--device cpu"):
            resolve_device("cuda")


@pytest.mark.parametrize(
    "kwargs, match",
    [({"epochs": 0}, "epochs"), ({"batch_size": -1}, "batch_size"), ({"train_split": 1.0}, "train_split"),
     ({"rtol": 0.0}, "rtol"), ({"n_samples": 1}, "n_samples"), ({"sensealg": "zygote"}, "sensealg"),
     ({"threads": 0}, "threads"), ({"adjoint_first_step": "auto"}, "adjoint_first_step='auto' is not one of hairer"),
     ({"arch": "odenet", "width": 0}, "width must be a positive integer"), ({"width": 8}, "arch='odenet' only"),
     ({"pooled_head": True}, "arch='odenet' only"), ({"arch": "odenet", "pooled_head": 1}, "pooled_head must be True")],
)  # fmt: skip
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


@pytest.mark.slow
@pytest.mark.parametrize(
    "kwargs",
    [
        {},  # InterpolatingAdjoint(ZygoteVJP) on a ComponentArray: the tutorial's first run
        {"sensealg": "gauss", "params": "tree"},  # GaussAdjoint on NamedTuple parameters
        {"vjp": "func"},  # InterpolatingAdjoint(ReverseDiffVJP) on the CPU
        {"sensealg": "direct"},  # ReverseDiffAdjoint: discrete sensitivities
    ],
    ids=["interpolating-flat", "gauss-tree", "interpolating-func", "direct"],
)
def test_tutorial_runs_reach_the_tutorials_accuracy(kwargs):
    """9 epochs, seed 0, 1350 / 150 images: the accuracy the tutorial reaches (87 % / 82-84 %)."""
    res = train(TrainConfig(device="cpu", **kwargs), log=None)
    last = res.epochs[-1]
    assert (res.n_train, res.n_test) == (1350, 150)
    assert last.train_accuracy >= 0.85 and last.test_accuracy >= 0.80, last


# --- reproducibility, config, ODE work -----------------------------------------------------------


def _small_run(images, **kwargs):
    x, y = images
    config = TrainConfig(**{"device": "cpu", "epochs": 2, "batch_size": 64, "lr": 3e-3, "sensealg": "direct", **kwargs})
    return train(config, log=None, data=((x[:192], y[:192]), (x[192:], y[192:])))


def _numbers(res):
    return [(e.train_accuracy, e.test_accuracy, e.mean_loss, e.f_evals_forward, e.f_evals_backward) for e in res.epochs]


def test_the_same_seed_gives_the_same_numbers(images):
    a, b, c = _small_run(images, seed=3), _small_run(images, seed=3), _small_run(images, seed=4)
    sa, sb, sc = (r.model.state_dict() for r in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert _numbers(a) == _numbers(b)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)  # another seed: other weights and batches


def test_deterministic_runs_and_restores_the_global_flag(images):
    before = torch.are_deterministic_algorithms_enabled()
    det = _small_run(images, deterministic=True)
    assert torch.are_deterministic_algorithms_enabled() == before
    plain = _small_run(images)
    assert all(torch.equal(v, plain.model.state_dict()[k]) for k, v in det.model.state_dict().items())


def test_an_op_without_a_deterministic_kernel_is_a_clear_error(images, monkeypatch):
    import odeflux.mnist.train as train_module

    def refuse(*args, **kwargs):  # what torch raises for such an op under use_deterministic_algorithms(True)
        raise RuntimeError("scatter_add_cuda_kernel does not have a deterministic implementation, but you set "
                           "'torch.use_deterministic_algorithms(True)'.\nmore details")

    monkeypatch.setattr(train_module, "train_step", refuse)  # the loop's own reference to the step
    with pytest.raises(DeterminismError) as err:
        _small_run(images, deterministic=True)
    msg = str(err.value)
    assert "\n" not in msg and "--deterministic" in msg and "scatter_add_cuda_kernel" in msg
    with pytest.raises(RuntimeError, match="scatter_add") as err:  # without the flag it is not ours to explain
        _small_run(images)
    assert not isinstance(err.value, DeterminismError)


def test_epoch_results_count_the_ode_work(images):
    res = _small_run(images, sensealg="interpolating", params="tree", epochs=1)
    e = res.epochs[0]
    # Tsit5: 6 new evaluations per step (FSAL) plus the first; the adjoint runs its own steps.
    assert e.f_evals_forward >= 7 and e.f_evals_backward > 0 and e.lr == 3e-3
    direct = _small_run(images, epochs=1).epochs[0]
    assert direct.f_evals_backward == direct.f_evals_forward


def test_config_round_trips_through_a_dict():
    from dataclasses import asdict

    config = TrainConfig(sensealg="gauss", n_samples="all", data_dir="/data", seed=5)
    assert TrainConfig.from_dict(asdict(config)) == config
    assert TrainConfig.from_dict({"epochs": 2}) == TrainConfig(epochs=2)
    with pytest.raises(ValueError, match="unknown config fields colour"):
        TrainConfig.from_dict({"colour": "red"})


def test_the_architecture_reaches_create_model():
    tutorial = build_model(TrainConfig(params="tree")).state_dict()
    assert all(torch.equal(v, create_model(params="tree").state_dict()[k]) for k, v in tutorial.items())
    model = build_model(TrainConfig(arch="odenet", params="tree"))
    assert any(isinstance(m, nn.Conv2d) for m in model.modules())
    pooled = build_model(TrainConfig(arch="odenet", width=4, pooled_head=True, params="tree"))
    assert [tuple(p.shape) for p in pooled.head.parameters()][-2:] == [(10, 4), (10,)]  # Linear(width -> 10)


def test_the_kill_hook_accepts_only_its_forms():
    assert KillHook(None).kind is None and KillHook("batch:3").at == 3
    for bad in ("batch", "batch:0", "step:2", "epoch:x"):
        with pytest.raises(ValueError, match="ODEFLUX_TEST_KILL_AT"):
            KillHook(bad)


def test_cosine_schedule_decays_to_zero_and_resumes_exactly():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    sched = CosineLR(opt, 0.5, total=10)
    lrs = []
    for _ in range(10):
        sched()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == 0.5 and all(a > b for a, b in zip(lrs, lrs[1:])) and lrs[-1] > 0
    assert lrs[5] == pytest.approx(0.5 * 0.5 * (1 + math.cos(math.pi / 2)))
    resumed = CosineLR(opt, 0.5, total=10, step=6)
    resumed()
    assert opt.param_groups[0]["lr"] == lrs[6]
