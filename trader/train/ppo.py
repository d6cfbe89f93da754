"""MaskablePPO training on :class:`~trader.train.env.TradingEnv` and ONNX export.

The exported graph takes ``obs`` float32[N, dim] and ``action_mask`` bool[N, 6] and returns
``probs`` float32[N, 6] (masked softmax of the policy head: illegal actions get exactly 0) and
``value`` float32[N, 1]. Observation normalisation, when on, is a layer of the network itself
(fixed mean/std measured on the training episodes, then clipped to ±``NORM_CLIP``), so it is in the
exported graph and there is no separate normaliser file to lose. The export is checked against the
torch policy on random and real observations: probabilities must agree within ``EXPORT_TOLERANCE``
absolutely, the value (in reward units, tens) within ``EXPORT_TOLERANCE`` of its magnitude; otherwise
the export fails and no file is written. The check's numbers go into the metadata (``export_check``).
"""

from __future__ import annotations

import json
import subprocess
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from sb3_contrib import MaskablePPO
from stable_baselines3.common.callbacks import BaseCallback, CheckpointCallback
from stable_baselines3.common.logger import configure
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from stable_baselines3.common.utils import set_random_seed
from stable_baselines3.common.vec_env import DummyVecEnv
from torch import nn

from trader import __version__
from trader.config import Settings
from trader.features.layout import ObservationLayout
from trader.policy import metadata_for
from trader.train.env import RewardConfig, TradingEnv

NORM_CLIP = 10.0
EXPORT_TOLERANCE = 1e-5
OPSET = 17
ROOT = Path(__file__).resolve().parents[2]


class ExportError(RuntimeError):
    pass


@dataclass
class TrainConfig:
    """Everything a training run depends on; written into the policy's metadata."""

    train_from: str = "2023-11-19T18:00:00"
    train_to: str = "2023-11-27T18:00:00"  # exclusive; validation starts here
    timesteps: int = 200_000
    hidden: tuple[int, ...] = (64, 64)
    learning_rate: float = 3e-4
    n_steps: int = 2048
    batch_size: int = 256
    n_epochs: int = 10
    gamma: float = 0.99
    gae_lambda: float = 0.95
    clip_range: float = 0.2
    ent_coef: float = 0.01
    n_envs: int = 1
    normalize: bool = True
    seed: int = 7
    checkpoint_every: int = 50_000
    reward: RewardConfig = field(default_factory=RewardConfig)


class NormalizedInput(BaseFeaturesExtractor):
    """(obs − mean) / std, clipped to ±NORM_CLIP; identity when no statistics are given."""

    def __init__(
        self, observation_space: spaces.Box, mean: list[float] | None = None, std: list[float] | None = None
    ):
        dim = int(observation_space.shape[0])
        super().__init__(observation_space, features_dim=dim)
        m = torch.zeros(dim) if mean is None else torch.tensor(mean, dtype=torch.float32)
        s = torch.ones(dim) if std is None else torch.tensor(std, dtype=torch.float32)
        self.mean: torch.Tensor
        self.inv_std: torch.Tensor
        self.register_buffer("mean", m)
        self.register_buffer("inv_std", 1.0 / s)
        self.clip = mean is not None

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        x = (obs - self.mean) * self.inv_std
        return torch.clamp(x, -NORM_CLIP, NORM_CLIP) if self.clip else x


class ExportablePolicy(nn.Module):
    """(obs, action_mask) ─▶ (masked action probabilities, value): what the daemon serves."""

    def __init__(self, policy: Any) -> None:
        super().__init__()
        self.extractor = policy.features_extractor
        self.mlp = policy.mlp_extractor
        self.action_net = policy.action_net
        self.value_net = policy.value_net

    def forward(self, obs: torch.Tensor, action_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.extractor(obs)
        latent_pi, latent_vf = self.mlp(feats)
        logits = self.action_net(latent_pi)
        logits = torch.where(action_mask, logits, torch.full_like(logits, -1e8))
        probs = torch.softmax(logits, dim=-1) * action_mask.to(logits.dtype)
        return probs, self.value_net(latent_vf)


def make_env(
    settings: Settings, cfg: TrainConfig, data_paths: list[Path] | None, log_dir: Path | None
) -> TradingEnv:
    return TradingEnv(
        settings,
        data_paths=data_paths,
        episode_from=cfg.train_from,
        episode_to=cfg.train_to,
        reward=cfg.reward,
    )


def observation_stats(
    env: TradingEnv, seed: int, passes: int = 2
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and std of observations on the training episodes under random legal actions; also
    returns the observations (used again by the export check)."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(passes):
        for k in range(env.n_episodes):
            obs, _ = env.reset(options={"episode": k})
            rows.append(obs)
            done = False
            while not done:
                a = int(rng.choice(np.flatnonzero(env.action_masks())))
                obs, _, done, _, _ = env.step(a)
                rows.append(obs)
    x = np.asarray(rows, dtype=np.float64)
    mean = x.mean(axis=0)
    std = x.std(axis=0)
    std[std < 1e-6] = 1.0  # constant features pass through centred
    return mean.astype(np.float32), std.astype(np.float32), x.astype(np.float32)


def git_revision() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True
        )
        rev = out.stdout.strip() or "unknown"
        return rev + ("-dirty" if dirty.stdout.strip() else "")
    except OSError:
        return "unknown"


def train(
    settings: Settings,
    cfg: TrainConfig,
    run_dir: Path,
    data_paths: list[Path] | None = None,
    progress_bar: bool = False,
    verbose: int = 0,
) -> tuple[MaskablePPO, TradingEnv, np.ndarray]:
    """Train; returns the model, a training env and the observations used for normalisation."""
    set_random_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)  # one thread: the same result on any machine
    run_dir.mkdir(parents=True, exist_ok=True)
    probe = make_env(settings, cfg, data_paths, None)
    probe.reset(seed=cfg.seed)
    mean, std, sample = observation_stats(probe, cfg.seed)
    if not cfg.normalize:
        mean_l, std_l = None, None
    else:
        mean_l, std_l = mean.tolist(), std.tolist()

    def factory(i: int) -> Callable[[], gym.Env[Any, Any]]:
        def _make() -> gym.Env[Any, Any]:
            env = make_env(settings, cfg, data_paths, run_dir)
            env.reset(seed=cfg.seed + i)
            return Monitor(env, str(run_dir / f"monitor_{i}"))  # MaskablePPO calls env.action_masks()

        return _make

    venv = DummyVecEnv([factory(i) for i in range(cfg.n_envs)])
    venv.seed(cfg.seed)
    model = MaskablePPO(
        "MlpPolicy",
        venv,
        learning_rate=cfg.learning_rate,
        n_steps=cfg.n_steps,
        batch_size=cfg.batch_size,
        n_epochs=cfg.n_epochs,
        gamma=cfg.gamma,
        gae_lambda=cfg.gae_lambda,
        clip_range=cfg.clip_range,
        ent_coef=cfg.ent_coef,
        seed=cfg.seed,
        device="cpu",
        verbose=verbose,
        policy_kwargs={
            "net_arch": {"pi": list(cfg.hidden), "vf": list(cfg.hidden)},
            "activation_fn": nn.Tanh,
            "features_extractor_class": NormalizedInput,
            "features_extractor_kwargs": {"mean": mean_l, "std": std_l},
        },
    )
    model.set_logger(configure(str(run_dir), ["csv", "log"] if verbose == 0 else ["stdout", "csv", "log"]))
    callbacks: list[BaseCallback] = []
    if cfg.checkpoint_every > 0:
        callbacks.append(
            CheckpointCallback(
                max(cfg.checkpoint_every // cfg.n_envs, 1), str(run_dir / "checkpoints"), name_prefix="ppo"
            )
        )
    t0 = time.perf_counter()
    model.learn(total_timesteps=cfg.timesteps, callback=callbacks, progress_bar=progress_bar)
    (run_dir / "train_summary.json").write_text(
        json.dumps({"wall_s": round(time.perf_counter() - t0, 1), "timesteps": model.num_timesteps}, indent=2)
    )
    model.save(run_dir / "final_model.zip")
    return model, probe, sample


def export_onnx(
    model: MaskablePPO,
    layout: ObservationLayout,
    out: Path,
    real_obs: np.ndarray,
    meta: dict[str, Any],
    seed: int = 0,
) -> float:
    """Write the ONNX policy with its metadata; check it against torch. Returns the max abs diff."""
    import onnx
    import onnxruntime as ort

    net = ExportablePolicy(model.policy).eval()
    dim = layout.dim
    dummy = (torch.zeros(1, dim), torch.ones(1, 6, dtype=torch.bool))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.onnx")
    with torch.no_grad(), warnings.catch_warnings():
        # The TorchScript exporter: the dynamo one needs onnxscript and gives the same graph here.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            net,
            dummy,
            str(tmp),
            input_names=["obs", "action_mask"],
            output_names=["probs", "value"],
            dynamic_axes={k: {0: "batch"} for k in ("obs", "action_mask", "probs", "value")},
            opset_version=OPSET,
            dynamo=False,
        )
    rng = np.random.default_rng(seed)
    rand = rng.normal(0.0, 1.0, size=(512, dim)).astype(np.float32) * (np.abs(real_obs).mean(0) + 1.0)
    real = real_obs[rng.choice(len(real_obs), size=min(2048, len(real_obs)), replace=False)]
    obs = np.concatenate([rand, real]).astype(np.float32)
    masks = rng.random((len(obs), 6)) < 0.6
    masks[:, 0] = True  # HOLD is always legal
    masks[: len(obs) // 4] = True
    sess = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
    got_p, got_v = sess.run(["probs", "value"], {"obs": obs, "action_mask": masks})
    del sess
    with torch.no_grad():
        ref_p, ref_v = net(torch.from_numpy(obs), torch.from_numpy(masks))
    ref_p_np, ref_v_np = ref_p.numpy(), ref_v.numpy()
    diff = float(np.abs(got_p - ref_p_np).max())
    # The value is in reward units (tens): one float32 ulp there is ~4e-6, so its difference is
    # measured relative to its magnitude (floored at 1), the probabilities' absolutely.
    diff_v = float((np.abs(got_v - ref_v_np) / np.maximum(np.abs(ref_v_np), 1.0)).max())
    problem = None
    if not diff <= EXPORT_TOLERANCE:
        problem = f"probabilities: torch vs onnxruntime max abs diff {diff:.2e} > {EXPORT_TOLERANCE}"
    elif not diff_v <= EXPORT_TOLERANCE:
        problem = f"value: torch vs onnxruntime max relative diff {diff_v:.2e} > {EXPORT_TOLERANCE}"
    elif (got_p[~masks] != 0).any():
        problem = "a masked action has non-zero probability"
    if problem:
        tmp.unlink()
        raise ExportError(f"export check failed: {problem}")
    proto = onnx.load(str(tmp))
    checked = {"probs_max_abs_diff": diff, "value_max_rel_diff": diff_v, "inputs": len(obs)}
    full = metadata_for(layout, output_kind="probs", opset=OPSET, export_check=checked, **meta)
    for k, v in full.items():
        p = proto.metadata_props.add()
        p.key, p.value = k, v
    onnx.checker.check_model(proto)
    onnx.save(proto, str(tmp))
    tmp.replace(out)
    return diff


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "missing"


def training_metadata(cfg: TrainConfig, data_files: tuple[str, ...], timesteps: int) -> dict[str, Any]:
    c = asdict(cfg)
    return {
        "trained_by": "scripts/train_policy (sb3-contrib MaskablePPO on trader.train.env.TradingEnv)",
        "train_range": f"{cfg.train_from} .. {cfg.train_to}",
        "data_files": json.dumps({Path(f).name: _sha256(Path(f)) for f in data_files}),
        "timesteps": timesteps,
        "seed": cfg.seed,
        "hidden": list(cfg.hidden),
        "learning_rate": cfg.learning_rate,
        "obs_normalisation": "folded into the graph" if cfg.normalize else "none",
        "reward": json.dumps(c["reward"]),
        "hyperparameters": json.dumps({k: v for k, v in c.items() if k != "reward"}),
        "package_version": __version__,
        "git_revision": git_revision(),
        "torch_version": torch.__version__,
    }


@dataclass(frozen=True)
class TrainedPolicy:
    """What :func:`train_and_export` wrote: the ONNX file and what it was trained on."""

    path: Path
    timesteps: int
    sessions: int  # training episodes (trading sessions)
    features: int  # observation size
    export_diff: float  # torch vs onnxruntime, max abs difference of the probabilities
    wall_s: float


def train_and_export(
    settings: Settings,
    cfg: TrainConfig,
    out: Path,
    run_dir: Path,
    data_paths: list[Path] | None = None,
    *,
    extra_metadata: dict[str, str] | None = None,
    progress_bar: bool = False,
) -> TrainedPolicy:
    """Train (:func:`train`: seeded, one torch thread, so the same settings, config and data give
    the same policy) and export to ``out`` with its metadata: the training provenance, the market
    it is for, and ``extra_metadata``. Only bars ``settings.data`` selects are loaded, so a
    ``data.end`` keeps every later bar out of training. Raises :class:`ExportError` when the export
    check fails (nothing is written then)."""
    from trader.policy import trained_for

    t0 = time.perf_counter()
    model, env, sample = train(settings, cfg, run_dir, data_paths, progress_bar=progress_bar)
    meta = training_metadata(cfg, env.bars.files, int(model.num_timesteps))
    meta.update(trained_for(settings))
    meta.update(extra_metadata or {})
    try:
        diff = export_onnx(model, env.layout, out, sample, meta, seed=cfg.seed)
    finally:
        env.close()
    return TrainedPolicy(
        Path(out),
        int(model.num_timesteps),
        env.n_episodes,
        env.layout.dim,
        diff,
        round(time.perf_counter() - t0, 2),
    )
