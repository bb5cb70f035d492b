"""LSTM / GRU relevance (Arras et al.): reference agreement, conservation, API forms."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference_lstm import lstm_lrp
from torch import nn

import relprop
from relprop import Composite, Epsilon, RecurrentRule


class LastStep(nn.Module):
    """Explains the LSTM's last output step directly (no head), optionally with c_n."""

    def __init__(self, lstm: nn.Module, with_cell: bool = False) -> None:
        super().__init__()
        self.lstm = lstm
        self.with_cell = with_cell

    def forward(self, x):
        out, (h_n, c_n) = self.lstm(x)
        last = out[:, -1] if self.lstm.batch_first else out[-1]
        return torch.cat([last, c_n[-1]], 1) if self.with_cell else last


def composite(bias: str, eps: float = 1e-3, bf: float = 1.0) -> Composite:
    return Composite(default=Epsilon(), recurrent=RecurrentRule(epsilon=eps, bias=bias,
                                                                bias_factor=bf))


CASES = [(layers, bi, bias, bf, cell) for layers in (1, 2) for bi in (False, True)
         for bias, bf in (("absorb", 0.0), ("distribute", 1.0), ("distribute", 0.5))
         for cell in (False, True)]


@pytest.mark.parametrize(("layers", "bi", "bias", "bf", "cell"), CASES)
def test_lstm_matches_arras_reference(layers, bi, bias, bf, cell) -> None:
    lstm = nn.LSTM(4, 5, num_layers=layers, bidirectional=bi, batch_first=True).double()
    model = LastStep(lstm, cell).eval()
    x = torch.randn(3, 6, 4, dtype=torch.float64)
    target = 7 if cell else 2
    expl = relprop.explain(model, x, target=target, composite=composite(bias, 1e-3, bf))
    dirs, H, k = (2 if bi else 1), 5, layers * (2 if bi else 1)
    out = model(x).detach().numpy()
    for n in range(len(x)):
        R_out = np.zeros((6, dirs * H))
        R_cn = np.zeros((k, H))
        if target < dirs * H:
            R_out[-1, target] = out[n, target]
        else:
            R_cn[k - 1 - (dirs - 1), target - dirs * H] = out[n, target]  # c_n[-1]
            if bi:  # c_n[-1] is the top layer's reverse direction
                R_cn[:] = 0
                R_cn[k - 1, target - dirs * H] = out[n, target]
        ref = lstm_lrp(lstm, x[n].numpy(), R_out, np.zeros((k, H)), R_cn, 1e-3, bf)
        np.testing.assert_allclose(expl.relevance[n].numpy(), ref, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("gru", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
def test_bias_factor_one_conserves(gru: bool, batch_first: bool) -> None:
    cls = nn.GRU if gru else nn.LSTM
    rnn = cls(4, 6, num_layers=2, bidirectional=True, batch_first=batch_first).double()

    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn, self.fc = rnn, nn.Linear(12, 3, bias=False)

        def forward(self, x):  # relprop explains batch-first inputs: transpose inside
            out, _ = self.rnn(x if batch_first else x.transpose(0, 1))
            return self.fc(out[:, -1] if batch_first else out[-1])

    model = Head().double().eval()
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    with torch.no_grad():
        expl_inputs = model(x)
    comp = Composite(default=Epsilon(1e-12), stabilizer=1e-12,
                     recurrent=RecurrentRule(bias="distribute", bias_factor=1.0))
    expl = relprop.explain(model, x, composite=comp, record=True)
    torch.testing.assert_close(expl.output, expl_inputs, rtol=1e-12, atol=1e-14)
    rel = expl.relevance
    entry = expl.ledger["rnn"]
    # with bias factor 1 nothing is absorbed: all relevance reaches the input, except the
    # share the bias terms hand to the (zero) initial state at the first step
    assert entry.bias.abs().max() < 1e-12 and entry.stabilizer.abs().max() < 1e-12
    initial_state = entry.other
    torch.testing.assert_close(rel.sum((1, 2)) + initial_state, expl.explained, rtol=1e-9,
                               atol=1e-12)


def test_bias_free_lstm_conserves() -> None:
    lstm = nn.LSTM(4, 6, bias=False, batch_first=True).double()
    model = LastStep(lstm).eval()
    x = torch.randn(3, 7, 4, dtype=torch.float64)
    expl = relprop.explain(model, x, composite=composite("absorb", eps=1e-9), record=True)
    torch.testing.assert_close(expl.relevance.sum((1, 2)), expl.explained, rtol=1e-5, atol=0.0)


def test_absorbed_biases_are_in_the_ledger() -> None:
    lstm = nn.LSTM(4, 6, batch_first=True).double()
    model = LastStep(lstm).eval()
    x = torch.randn(3, 7, 4, dtype=torch.float64)
    expl = relprop.explain(model, x, composite=composite("absorb"), record=True)
    totals = expl.ledger.totals()
    gap = expl.explained - expl.relevance.sum((1, 2))
    torch.testing.assert_close(totals["leaked"], gap, rtol=1e-9, atol=1e-12)
    assert (totals["bias"].abs() > 0).all()


class Cells(nn.Module):
    def __init__(self, gru: bool) -> None:
        super().__init__()
        self.gru = gru
        self.cell = nn.GRUCell(3, 4) if gru else nn.LSTMCell(3, 4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        h = x.new_zeros(x.shape[0], 4)
        c = x.new_zeros(x.shape[0], 4)
        for t in range(x.shape[1]):
            if self.gru:
                h = self.cell(x[:, t], h)
            else:
                h, c = self.cell(x[:, t], (h, c))
        return self.fc(h)


@pytest.mark.parametrize("gru", [False, True])
def test_cells_unrolled_by_hand_equal_the_layer(gru: bool) -> None:
    cells = Cells(gru).double().eval()
    layer = (nn.GRU if gru else nn.LSTM)(3, 4, batch_first=True).double()
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(layer, name + "_l0").copy_(getattr(cells.cell, name))

    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn, self.fc = layer, cells.fc

        def forward(self, x):
            return self.fc(self.rnn(x)[0][:, -1])

    x = torch.randn(2, 5, 3, dtype=torch.float64)
    comp = composite("distribute")
    a = relprop.explain(cells, x, target=1, composite=comp)
    b = relprop.explain(Layer().eval(), x, target=1, composite=comp)
    torch.testing.assert_close(a.output, b.output)
    # the cell version routes h0 = 0 through the graph; the shares it hands to the zero
    # initial state are lost there as in the layer, so the maps agree
    torch.testing.assert_close(a.relevance, b.relevance, rtol=1e-6, atol=1e-10)


class HandLSTM(nn.Module):
    """An LSTM cell written with functional ops: Linear, chunk, sigmoid gates, tanh."""

    def __init__(self) -> None:
        super().__init__()
        self.x2h = nn.Linear(3, 16, bias=False)
        self.h2h = nn.Linear(4, 16, bias=False)
        self.fc = nn.Linear(4, 2, bias=False)

    def forward(self, x):
        h = x.new_zeros(x.shape[0], 4)
        c = x.new_zeros(x.shape[0], 4)
        for t in range(x.shape[1]):
            i, f, g, o = (self.x2h(x[:, t]) + self.h2h(h)).chunk(4, 1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
        return self.fc(h)


def test_hand_written_cell_is_explained_with_gates() -> None:
    model = HandLSTM().double().eval()
    x = torch.randn(3, 4, 3, dtype=torch.float64)
    expl = relprop.explain(model, x, composite="epsilon", epsilon=1e-12, stabilizer=1e-12)
    # bias-free: gates take nothing, everything else conserves
    torch.testing.assert_close(expl.relevance.sum((1, 2)), expl.explained, rtol=1e-6, atol=0.0)


def test_packed_sequences_are_refused_clearly() -> None:
    lstm = nn.LSTM(3, 4, batch_first=True)

    class Packed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm = lstm

        def forward(self, x):
            packed = nn.utils.rnn.pack_padded_sequence(x, [3, 2], batch_first=True)
            return self.lstm(packed)[1][0][-1]

    with pytest.raises((relprop.UnsupportedOperationError, relprop.TraceError),
                       match="pack"):
        relprop.explain(Packed(), torch.randn(2, 3, 3))
