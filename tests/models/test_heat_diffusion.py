import math

import pytest
import torch

from fwi_core.models import create_model
from fwi_core.models.heat_diffusion import (HeatDiffusion, SpatialGradientFeatures, dct_matrix,
                                            grid_gradient, heat_kernel, neumann_eigenvalues)

H = 10.0                                   # grid spacing (m)
N = 70
X = torch.arange(N, dtype=torch.float64) * H   # cell centres, walls at -5 m and 695 m
TINY = dict(width=4, channels=8, blocks=2, mlp_hidden=8)


def gaussian_2d(cx, cz, var):
    """exp(-|p - c|^2 / (2 var)) on the grid, (70, 70) indexed (z, x)."""
    return torch.exp(-((X[None, :] - cx) ** 2 + (X[:, None] - cz) ** 2) / (2 * var))


def test_dct_rows_are_neumann_laplacian_eigenvectors():
    d = dct_matrix(N)
    torch.testing.assert_close(d @ d.T, torch.eye(N, dtype=torch.float64), atol=1e-12, rtol=0)
    # 3-point Laplacian with reflecting (zero-flux) ghost cells u[-1] = u[0], u[n] = u[n-1]
    lap = 2 * torch.eye(N, dtype=torch.float64) - torch.diag(torch.ones(N - 1), 1).double() \
        - torch.diag(torch.ones(N - 1), -1).double()
    lap[0, 0] = lap[-1, -1] = 1
    lap = lap / H ** 2
    torch.testing.assert_close(lap @ d.T, d.T * neumann_eigenvalues(N, H, "fd"), atol=1e-12, rtol=0)
    lam = neumann_eigenvalues(N, H, "spectral")
    assert lam[0] == 0 and math.isclose(lam[1], (math.pi / (N * H)) ** 2)


def test_gaussian_spreads_as_the_analytic_heat_solution():
    """A Gaussian of variance s^2 diffused for time t is a Gaussian of variance s^2 + 2t
    (per axis), amplitude s^2 / (s^2 + 2t) in 2-D; checked away from the walls."""
    s2, t = 30.0 ** 2, 400.0                  # m^2: sigma 30 m -> 41 m
    u0 = gaussian_2d(345.0, 345.0, s2)
    exact = s2 / (s2 + 2 * t) * gaussian_2d(345.0, 345.0, s2 + 2 * t)
    u = heat_kernel(u0, torch.tensor(t, dtype=torch.float64), spacing=H)
    assert (u - exact).abs().max() < 1e-10
    w = u / u.sum()                            # second moment in metres: s^2 + 2t per axis
    var_x = (w * (X[None, :] - 345.0) ** 2).sum()
    assert abs(var_x.item() - (s2 + 2 * t)) < 1e-6
    fd = heat_kernel(u0, torch.tensor(t, dtype=torch.float64), spacing=H, laplacian="fd")
    err_fd = (fd - exact).abs().max().item()
    assert 1e-5 < err_fd < 2e-2                # second-order accurate, visibly not exact


def test_wall_reflects_as_a_mirror_image():
    """Neumann wall at -h/2: the solution is the free-space one plus the mirror image
    centred at -h - x0 (method of images)."""
    s2, t, x0 = 20.0 ** 2, 300.0, 20.0
    u0 = gaussian_2d(x0, 345.0, s2) + gaussian_2d(-H - x0, 345.0, s2)   # already symmetric
    v = s2 + 2 * t
    exact = s2 / v * (gaussian_2d(x0, 345.0, v) + gaussian_2d(-H - x0, 345.0, v))
    u = heat_kernel(u0, torch.tensor(t, dtype=torch.float64), spacing=H)
    assert (u - exact).abs().max() < 1e-9
    one_sided = heat_kernel(gaussian_2d(x0, 345.0, s2), torch.tensor(t, dtype=torch.float64), spacing=H)
    torch.testing.assert_close(one_sided.sum(), gaussian_2d(x0, 345.0, s2).sum())   # no flux out


def test_layer_learns_one_time_per_channel():
    layer = HeatDiffusion(3, spacing=H).double()
    times = torch.tensor([50.0, 200.0, 800.0], dtype=torch.float64)
    with torch.no_grad():                     # diffusion times (m^2) set by hand
        layer.log_time.copy_(torch.log(times / layer.spacing ** 2))
    torch.testing.assert_close(layer.time, times)
    s2 = 25.0 ** 2
    u0 = gaussian_2d(345.0, 345.0, s2).expand(1, 3, N, N)
    u = layer(u0)
    for c, t in enumerate(times.tolist()):
        torch.testing.assert_close(u[0, c], s2 / (s2 + 2 * t) * gaussian_2d(345.0, 345.0, s2 + 2 * t),
                                   atol=1e-10, rtol=0)
    u.pow(2).sum().backward()
    assert torch.all(layer.log_time.grad < 0)  # longer diffusion lowers the peak energy
    with pytest.raises(ValueError, match="HeatDiffusion"):
        layer(torch.zeros(1, 2, N, N, dtype=torch.float64))


def test_grid_gradient_and_rotation_invariant_features():
    ramp = (3.0 * X[None, :] - 2.0 * X[:, None]).expand(1, 1, N, N)
    gx, gz = grid_gradient(ramp, H)
    assert torch.allclose(gx[..., 1:-1], torch.tensor(3.0, dtype=torch.float64))
    assert torch.allclose(gz[..., 1:-1, :], torch.tensor(-2.0, dtype=torch.float64))
    torch.manual_seed(0)
    feats = SpatialGradientFeatures(4, H).double()
    u = heat_kernel(torch.randn(2, 4, N, N, dtype=torch.float64), torch.tensor(200.0, dtype=torch.float64))
    f = feats(u)
    assert f.shape == u.shape and f.abs().max() > 1e-2
    # rotating the field by 90 degrees rotates every gradient vector the same way:
    # <g, A g> with A a complex (rotation-scaling) product does not change
    torch.testing.assert_close(feats(torch.rot90(u, 1, (-2, -1))), torch.rot90(f, 1, (-2, -1)),
                               atol=1e-12, rtol=1e-10)


def test_invalid_settings():
    with pytest.raises(ValueError, match="laplacian"):
        neumann_eigenvalues(5, 1.0, "fft")
    with pytest.raises(ValueError, match="spacing"):
        neumann_eigenvalues(5, 0.0)


def test_diffusion_runs_in_float32_under_autocast():
    layer = HeatDiffusion(2, spacing=H)
    u = gaussian_2d(345.0, 345.0, 30.0 ** 2).expand(1, 2, N, N).bfloat16()
    ref = layer(u.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(u)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, ref.bfloat16())    # float32 transforms, one rounding at the end
