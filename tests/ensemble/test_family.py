"""Family classifier: learns families that differ in their gathers, save/load round trip."""
import pytest
import torch
from torch.utils.data import Dataset

from fwi_core.ensemble.family import FamilyClassifier
from fwi_core.ensemble.family_fit import train_family_classifier


class Gathers(Dataset):
    """Families differ by frequency and amplitude of their (5, 64, 16) gathers."""

    SPECS = {"FlatVel_A": (2.0, 0.3), "CurveFault_B": (9.0, 0.3), "Style_A": (2.0, 0.9)}

    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        t = torch.linspace(0, 1, 64).view(1, 64, 1)
        self.items = []
        fams = list(self.SPECS)
        for i in range(n):
            fam = fams[i % 3]
            freq, amp = self.SPECS[fam]
            phase = torch.rand(5, 1, 16, generator=g) * 6.28
            x = amp * torch.sin(6.28 * freq * t + phase) + 0.1 * torch.randn(5, 64, 16, generator=g)
            self.items.append((x, torch.zeros(1, 4, 4), fam))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def test_learns_families_and_round_trips(tmp_path):
    clf = train_family_classifier(Gathers(120, 0), epochs=4, batch_size=15, lr=5e-3, width=8,
                                  time_size=32, receiver_size=8, val_dataset=Gathers(30, 1), progress=False)
    rep = clf.report
    assert rep["families"] == sorted(Gathers.SPECS)
    assert rep["train_loss"][-1] < rep["train_loss"][0]
    assert rep["val_accuracy"] >= 0.8, rep
    x = torch.stack([Gathers(6, 2)[i][0] for i in range(6)])
    proba = clf.predict_proba(x)
    assert proba.shape == (6, 3) and torch.allclose(proba.sum(1), torch.ones(6))
    path = clf.save(tmp_path / "fc.pt")
    back = FamilyClassifier.load(path)
    assert back.families == clf.families and back.report["val_accuracy"] == rep["val_accuracy"]
    assert torch.allclose(back.predict_proba(x), proba)
    assert back.predict(x) == clf.predict(x)


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="at least 2 distinct families"):
        FamilyClassifier(["A"])
    clf = FamilyClassifier(["A", "B"])
    with pytest.raises(ValueError, match=r"expected seismic \(B, 5, T, R\)"):
        clf(torch.zeros(1, 4, 10, 10))
    bad = tmp_path / "bad.pt"
    torch.save({"format": "other"}, bad)
    with pytest.raises(ValueError, match="not a family classifier file"):
        FamilyClassifier.load(bad)
    with pytest.raises(ValueError, match=r"families \['Style_A'\] are not in"):
        train_family_classifier(Gathers(3, 0), families=["FlatVel_A", "CurveFault_B"], epochs=1, progress=False)
