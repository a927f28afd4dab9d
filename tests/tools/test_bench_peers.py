"""tools/bench_peers.py: the peers compute our physics, and the ratios are per round."""
import numpy as np
import pytest
import torch

from fwi_core.physics import simulate
from tools import bench_peers

pytestmark = pytest.mark.usefixtures("one_thread")


def test_ratios_are_medians_of_per_round_ratios():
    times = {"ours": [1.0, 2.0, 10.0], "peer": [2.0, 2.0, 5.0]}  # per round: 0.5, 1.0, 2.0
    out = bench_peers.summarize(times, "ours")
    assert out["ours"] == (2.0, 1.0, 3) and out["peer"] == (2.0, 1.0, 3)
    # a slow round hits both contenders: per round 1.0, 0.1, 1.0 -> 1.0 (the medians' ratio would be 0.1)
    times = {"ours": [1.0, 1.0, 10.0], "peer": [1.0, 10.0, 10.0]}
    assert bench_peers.summarize(times, "ours")["peer"] == (10.0, 1.0, 3)


def test_relative_l2_aligns_polarity_and_the_one_sample_delay():
    rng = np.random.default_rng(0)
    ours = rng.standard_normal((2, 5, 40, 7))
    late = np.zeros_like(ours)
    late[:, :, 1:] = -ours[:, :, :-1]
    assert bench_peers.relative_l2(late, ours, align=True) == 0.0
    assert bench_peers.relative_l2(late, ours) > 1.0
    late[:, :, 31:] = 0.0  # a last quarter that differs completely
    assert bench_peers.relative_l2(late, ours, align=True, upto=30) == 0.0
    assert bench_peers.agreement(late, ours, align=True).startswith("0.0e+00 (")


def test_deepwave_peer_computes_our_physics():
    pytest.importorskip("deepwave")
    vel = bench_peers.maps(2)
    nt = 300
    with torch.no_grad():
        peer = bench_peers.DeepwavePeer(120, nt)(torch.from_numpy(vel)).numpy()
    ours = simulate(vel, nt=nt, backend="native")
    assert peer.shape == ours.shape
    assert bench_peers.relative_l2(peer, ours, align=True) < 0.01  # PML against sponge, other stencil weights


@pytest.mark.slow
def test_devito_peer_is_our_scheme():
    """The Devito operator is our update: until the wave reaches the grid's edge (where
    Devito's boundary is not periodic) it agrees with ours to float32 rounding."""
    pytest.importorskip("devito")
    vel = bench_peers.maps(2)
    nt = 250
    peer = bench_peers.DevitoPeer(120, nt, threads=1)(vel)
    ours = simulate(vel, nt=nt, backend="native")
    assert bench_peers.relative_l2(peer, ours) < 1e-4


@pytest.mark.slow
def test_run_writes_both_tables():
    text = bench_peers.run(batch=1, nt=40, rounds=2, grad_rounds=1, threads=1, pads=(20,))
    assert "| propagator, forward | s per sample | ours / peer | agreement with ours |" in text
    assert "| forward + gradient | s per sample | ours / peer |" in text
    row = next(line for line in text.splitlines() if line.startswith("| ours, `simulate` (native), 310x310"))
    assert float(row.split("|")[3]) == 1.0  # ours against ours, round by round
    assert "Our gradient (forward + backward, native) / our forward (native)" in text
