"""Reference trajectories of diffusers' flow-matching schedulers for tests/test_solvers.py.

Run from the repository root with the PyTorch reference environment (not the project's .venv):

    /tmp/torchenv/bin/python scripts/make_solver_fixtures.py   # writes tests/fixtures/solver_trajectories.npz

Model: a closed-form velocity field, no network. The data are a 1-D mixture of two Gaussians
N(+-MU, A^2) with equal weights; with x_s = (1 - s) x0 + s noise the exact x0 posterior mean is
    var = ((1 - s) A)^2 + s^2,  c = (1 - s) A^2 / var,
    E[x0 | x_s] = c x + MU (1 - c (1 - s)) tanh((1 - s) MU x / var)
and the velocity (noise - x0) is v(x, s) = (x - E[x0 | x_s]) / s. It is applied elementwise to
a (2, 64) float32 state drawn from numpy's default_rng(0) (the initial noise).

For each (steps, shift) in CONFIGS it runs, step by step as WanPipeline does (model output ->
scheduler.step):
  UniPC: UniPCMultistepScheduler(num_train_timesteps=1000, prediction_type="flow_prediction",
         use_flow_sigmas=True, flow_shift=shift, solver_order=2, solver_type="bh2",
         predict_x0=True, lower_order_final=True, disable_corrector=[]) -- Wan 2.1's config;
         twice: the model told the exact sigma (scheduler.sigmas[i]; key "exact") and the model
         told the pipeline's integer timestep t / 1000 (WanPipeline passes scheduler.timesteps,
         int64, to the DiT; key "pipe").
  Euler: FlowMatchEulerDiscreteScheduler(shift=shift), the model told sigma = t / 1000.

Writes tests/fixtures/solver_trajectories.npz (float32 unless noted), keys:
  x0                                the initial state (2, 64)
  mu, a                             the mixture's parameters (float64 scalars)
  unipc_{steps}_{shift}_sigmas      scheduler.sigmas (steps + 1,)
  unipc_{steps}_{shift}_timesteps   scheduler.timesteps (steps,), int64
  unipc_{steps}_{shift}_exact       states before the first and after every step (steps + 1, 2, 64)
  unipc_{steps}_{shift}_pipe        same, model told t / 1000
  euler_{steps}_{shift}_sigmas / _timesteps (float32) / _traj   likewise for Euler
shift is written with one decimal ("4_3.0"). Deterministic: no random draws besides the seeded
initial state, and the zip members carry a fixed date, so re-running rewrites identical bytes.
"""
import io
import pathlib
import zipfile

import diffusers
import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

ROOT = pathlib.Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "fixtures" / "solver_trajectories.npz"
CONFIGS = [(1, 3.0), (2, 2.0), (4, 3.0), (10, 5.0), (25, 1.0)]
MU, A = 1.0, 0.5


def velocity(x, s):
    """Exact velocity of the two-Gaussian mixture at noise level s (a float32 0-dim tensor)."""
    var = ((1 - s) * A) ** 2 + s**2
    c = (1 - s) * A * A / var
    e = c * x + MU * (1 - c * (1 - s)) * torch.tanh((1 - s) * MU * x / var)
    return (x - e) / s


def unipc(steps, shift):
    return UniPCMultistepScheduler(
        num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True,
        flow_shift=shift, solver_order=2, solver_type="bh2", predict_x0=True,
        lower_order_final=True, disable_corrector=[])


def run(sched, x, model_time):
    """Pipeline-style loop; model_time(sched, i, t) -> the noise level the model is told."""
    sched.set_begin_index(0)  # as WanPipeline
    traj = [x.clone()]
    for i, t in enumerate(sched.timesteps):
        v = velocity(x, model_time(sched, i, t))
        x = sched.step(v, t, x, return_dict=False)[0]
        traj.append(x.clone())
    return torch.stack(traj).numpy()


def write_npz(path, arrays):
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for k in sorted(arrays):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asarray(arrays[k]), allow_pickle=False)
            zf.writestr(zipfile.ZipInfo(k + ".npy", date_time=(1980, 1, 1, 0, 0, 0)), buf.getvalue(),
                        compress_type=zipfile.ZIP_DEFLATED)


def main():
    torch.set_grad_enabled(False)
    x0 = np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)
    out = {"x0": x0, "mu": np.float64(MU), "a": np.float64(A)}
    exact = lambda s, i, t: s.sigmas[i]
    told_t = lambda s, i, t: t.to(torch.float32) / 1000.0
    for steps, shift in CONFIGS:
        key = f"{steps}_{shift:.1f}"
        s = unipc(steps, shift)
        s.set_timesteps(steps)
        out[f"unipc_{key}_sigmas"] = s.sigmas.numpy().astype(np.float32)
        out[f"unipc_{key}_timesteps"] = s.timesteps.numpy().astype(np.int64)
        out[f"unipc_{key}_exact"] = run(s, torch.from_numpy(x0), exact)
        s = unipc(steps, shift)
        s.set_timesteps(steps)
        out[f"unipc_{key}_pipe"] = run(s, torch.from_numpy(x0), told_t)

        s = FlowMatchEulerDiscreteScheduler(shift=shift)
        s.set_timesteps(steps)
        out[f"euler_{key}_sigmas"] = s.sigmas.numpy().astype(np.float32)
        out[f"euler_{key}_timesteps"] = s.timesteps.numpy().astype(np.float32)
        out[f"euler_{key}_traj"] = run(s, torch.from_numpy(x0), told_t)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    write_npz(OUT, out)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes) with torch {torch.__version__}, "
          f"diffusers {diffusers.__version__}")


if __name__ == "__main__":
    main()
