"""The GNN: node embeddings on the user/merchant transaction graph, and an edge classifier.

This file is copied verbatim into every model version as ``gnn_model.py`` and imported there
by the Triton backend, so it imports only torch and torch_geometric.

For hop k = 1..n_hops, with E the user->merchant edges and E^T their reverse::

    h_merchant^k = dropout(relu(conv_k[user->merchant]((h_user^{k-1}, h_merchant^{k-1}), E)))
    h_user^k     = dropout(relu(conv_k[merchant->user]((h_merchant^{k-1}, h_user^{k-1}), E^T)))
    logits(u->m) = head([h_user[u] | h_merchant[m] | edge_attr(u->m)])

with h^0 = the node features. ``edge_features`` gives the XGBoost input of each edge:
[x_user | h_user | x_merchant | h_merchant | edge_attr].

With ``edge_means = k > 0``, h^0 of a node is its features followed by the mean of the last k
columns of its edges' features in the graph messages pass over (the causal graph/time
features: a merchant's mean new-card surge or reported fraud, a card's mean novelty), so two
hops carry what a card's merchants have seen. A mean, not a sum or a degree: it does not
depend on how densely the graph samples the stream (training passes messages over a sample,
serving over what it is sent).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.nn import GATConv, GATv2Conv, GraphConv, HeteroConv, SAGEConv

USER_TO_MERCHANT = ("user", "to", "merchant")
MERCHANT_TO_USER = ("merchant", "rev_to", "user")


def _sage(in_channels: tuple[int, int], out_channels: int) -> nn.Module:
    return SAGEConv(in_channels, out_channels)


def _graph(in_channels: tuple[int, int], out_channels: int) -> nn.Module:
    # Mean, not sum: a graph sent for scoring is far smaller than the training graph.
    return GraphConv(in_channels, out_channels, aggr="mean")


def _gat(in_channels: tuple[int, int], out_channels: int) -> nn.Module:
    # Self-loops are undefined between two node types.
    return GATConv(in_channels, out_channels, add_self_loops=False)


def _gatv2(in_channels: tuple[int, int], out_channels: int) -> nn.Module:
    return GATv2Conv(in_channels, out_channels, add_self_loops=False)


# The training container's layer names that PyG provides.
LAYERS = {"SAGEConv": _sage, "GraphConv": _graph, "GATConv": _gat, "GATv2Conv": _gatv2}


def _is_plain_sage(conv: nn.Module) -> bool:
    """A SAGEConv with mean aggregation, root weight, bias, no projection and no normalization."""
    return (isinstance(conv, SAGEConv) and str(conv.aggr) == "mean" and conv.root_weight
            and conv.lin_l.bias is not None and not conv.project and not conv.normalize)


# Inference through plain SAGEConv layers without HeteroConv/propagate, compiled with
# TorchScript: the same ops as PyG's mean scatter and Linear, so the embeddings are bitwise
# equal (tests/test_gnn.py), without PyG's per-call Python machinery. On a one-transaction
# graph message passing took 0.36-0.42 ms through HeteroConv, 0.18-0.20 ms as eager torch
# ops and 0.08-0.10 ms compiled; 0.45-0.52 vs 0.14-0.17 ms eager vs compiled with caches gone
# cold between calls, as in serving (docs/benchmarks.md).

@torch.jit.script
def _degree(index: Tensor, like: Tensor) -> Tensor:
    """How many edges end at each node of ``like``'s rows, at least 1, as a [n, 1] column."""
    count = like.new_zeros(like.size(0)).scatter_add_(0, index, like.new_ones(index.numel()))
    return count.clamp(min=1).view(-1, 1)


@torch.jit.script
def _sage_mean(x_src: Tensor, x_dst: Tensor, src: Tensor, dst: Tensor, degree: Tensor,
               weight_l_t: Tensor, bias_l: Tensor, weight_r_t: Tensor) -> Tensor:
    """``SAGEConv((x_src, x_dst), [src, dst])``: lin_l(mean of neighbours) + lin_r(x_dst), the
    Linear layers as the addmm/mm that F.linear runs on 2-D inputs, given transposed weights."""
    index = dst.view(-1, 1).expand(-1, x_src.size(1))
    total = x_src.new_zeros((x_dst.size(0), x_src.size(1))).scatter_add_(0, index, x_src.index_select(0, src))
    return torch.addmm(bias_l, total / degree, weight_l_t) + torch.mm(x_dst, weight_r_t)


@torch.jit.script
def _sage_embed(x_user: Tensor, x_merchant: Tensor, edge_index: Tensor, rev_edge_index: Tensor | None,
                weights: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Every hop's SAGEConv pair (dropout off): ``weights`` holds 6 per hop, the user->merchant
    conv's lin_l weight (transposed), lin_l bias and lin_r weight (transposed), then the
    merchant->user conv's.
    ``rev_edge_index`` (merchant -> user) defaults to the same pairs as ``edge_index``."""
    users, merchants = edge_index[0], edge_index[1]
    rev_merchants, rev_users = merchants, users
    if rev_edge_index is not None:
        rev_merchants, rev_users = rev_edge_index[0], rev_edge_index[1]
    user_degree = _degree(rev_users, x_user)
    merchant_degree = _degree(merchants, x_merchant)
    for hop in range(len(weights) // 6):
        w = weights[6 * hop:6 * hop + 6]
        merchant = _sage_mean(x_user, x_merchant, users, merchants, merchant_degree, w[0], w[1], w[2])
        user = _sage_mean(x_merchant, x_user, rev_merchants, rev_users, user_degree, w[3], w[4], w[5])
        x_user, x_merchant = F.relu(user), F.relu(merchant)
    return x_user, x_merchant


@torch.jit.script
def _mean_by(values: Tensor, index: Tensor, size: int) -> Tensor:
    """Per node (``size`` rows): the mean of ``values``' rows whose ``index`` is the node, 0 for none."""
    total = values.new_zeros((size, values.size(1))).index_add_(0, index, values)
    count = values.new_zeros(size).index_add_(0, index, values.new_ones(index.numel()))
    return total / count.clamp(min=1).view(-1, 1)


@torch.jit.script
def _edge_features(x_user: Tensor, h_user: Tensor, x_merchant: Tensor, h_merchant: Tensor, edge_index: Tensor,
                   edge_attr: Tensor) -> Tensor:
    """Each edge's [x_user | h_user | x_merchant | h_merchant | edge_attr]: the XGBoost input."""
    src, dst = edge_index[0], edge_index[1]
    return torch.cat([x_user[src], h_user[src], x_merchant[dst], h_merchant[dst], edge_attr], dim=1)


@torch.jit.script
def _sage_edge_features(x_user: Tensor, x_merchant: Tensor, edge_index: Tensor, edge_attr: Tensor,
                        weights: list[Tensor]) -> Tensor:
    h_user, h_merchant = _sage_embed(x_user, x_merchant, edge_index, None, weights)
    return _edge_features(x_user, h_user, x_merchant, h_merchant, edge_index, edge_attr)


class FraudGNN(nn.Module):
    """Heterogeneous GNN over users and merchants with an edge-classification head."""

    def __init__(self, user_channels: int, merchant_channels: int, edge_channels: int,
                 hidden_channels: int = 32, n_hops: int = 2, layer: str = "SAGEConv",
                 dropout_prob: float = 0.1, edge_means: int = 0):
        super().__init__()
        if layer not in LAYERS:
            raise ValueError(f"unknown GNN layer {layer!r}: choose one of {sorted(LAYERS)}")
        if not 0 <= edge_means <= edge_channels:
            raise ValueError(f"edge_means = {edge_means} must be in [0, edge_channels = {edge_channels}]")
        make = LAYERS[layer]
        self.dropout_prob = dropout_prob
        self.edge_means = edge_means
        self.convs = nn.ModuleList()
        user_in, merchant_in = user_channels + edge_means, merchant_channels + edge_means
        for _ in range(n_hops):
            self.convs.append(HeteroConv({
                USER_TO_MERCHANT: make((user_in, merchant_in), hidden_channels),
                MERCHANT_TO_USER: make((merchant_in, user_in), hidden_channels),
            }))
            user_in = merchant_in = hidden_channels
        self._sage_layers = all(_is_plain_sage(c) for hop in self.convs for c in hop.convs.values())
        # The compiled serving path (triton/model.py, sage.c) handles plain SAGEConv over the node
        # features as sent, without edge means.
        self._plain_sage = self._sage_layers and edge_means == 0
        self._sage_weights: list[Tensor] | None = None
        self.head = nn.Linear(2 * hidden_channels + edge_channels, 2)

    def node_inputs(self, x_user: Tensor, x_merchant: Tensor, edge_index: Tensor,
                    edge_attr: Tensor | None) -> tuple[Tensor, Tensor]:
        """h^0: the node features, with the means of their edges' last ``edge_means`` columns."""
        if self.edge_means == 0:
            return x_user, x_merchant
        if edge_attr is None:
            raise ValueError("this GNN averages edge features into its node inputs: pass edge_attr")
        tail = edge_attr[:, edge_attr.size(1) - self.edge_means:]
        return (torch.cat([x_user, _mean_by(tail, edge_index[0], x_user.size(0))], dim=1),
                torch.cat([x_merchant, _mean_by(tail, edge_index[1], x_merchant.size(0))], dim=1))

    def embed(self, x_user: Tensor, x_merchant: Tensor, edge_index: Tensor,
              rev_edge_index: Tensor | None = None, edge_attr: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Node embeddings (h_user [U, H], h_merchant [M, H]) by message passing over ``edge_index``
        and its reverse (``rev_edge_index`` when a neighbour sampler drew the reverse edges apart);
        ``edge_attr`` (of ``edge_index``) when the model averages edge features into node inputs."""
        x_user, x_merchant = self.node_inputs(x_user, x_merchant, edge_index, edge_attr)
        if self._sage_layers and not self.training:  # scoring, embedding for XGBoost, validation
            return _sage_embed(x_user, x_merchant, edge_index, rev_edge_index, self._sage_weights_list())
        x = {"user": x_user, "merchant": x_merchant}
        edges = {USER_TO_MERCHANT: edge_index,
                 MERCHANT_TO_USER: edge_index.flip(0) if rev_edge_index is None else rev_edge_index}
        for conv in self.convs:
            x = {kind: F.dropout(F.relu(h), self.dropout_prob, self.training)
                 for kind, h in conv(x, edges).items()}
        return x["user"], x["merchant"]

    def _sage_weights_list(self) -> list[Tensor]:
        """The weights ``_sage_embed`` takes (views of the parameters); gathering them took 0.08
        ms a request, so they are kept until the next train()/eval() or device/dtype change."""
        if self._sage_weights is None:
            with torch.no_grad():  # inference only: no autograd history kept with the views
                self._sage_weights = [
                    weight for hop in self.convs
                    for conv in (hop.convs[USER_TO_MERCHANT], hop.convs[MERCHANT_TO_USER])
                    for weight in (conv.lin_l.weight.t(), conv.lin_l.bias, conv.lin_r.weight.t())]
        return self._sage_weights

    def train(self, mode: bool = True) -> FraudGNN:
        # Optimizers and load_state_dict update parameters in place, which the views follow; a
        # model whose parameters were replaced is switched to eval() again before scoring.
        self._sage_weights = None
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):  # .to(), .cuda(), .float(): new parameter tensors
        self._sage_weights = None
        return super()._apply(fn, *args, **kwargs)

    def classify(self, h_user: Tensor, h_merchant: Tensor, edge_index: Tensor, edge_attr: Tensor) -> Tensor:
        """Fraud logits [E, 2] of the edges ``edge_index`` from the node embeddings."""
        src, dst = edge_index
        return self.head(torch.cat([h_user[src], h_merchant[dst], edge_attr], dim=1))

    def forward(self, x_user: Tensor, x_merchant: Tensor, edge_index: Tensor, edge_attr: Tensor,
                return_embeddings: bool = False):
        """Fraud logits [E, 2] of every edge; with ``return_embeddings`` also (h_user, h_merchant)."""
        h_user, h_merchant = self.embed(x_user, x_merchant, edge_index, edge_attr=edge_attr)
        logits = self.classify(h_user, h_merchant, edge_index, edge_attr)
        return (logits, (h_user, h_merchant)) if return_embeddings else logits

    @torch.no_grad()
    def edge_features(self, x_user: Tensor, x_merchant: Tensor, edge_index: Tensor,
                      edge_attr: Tensor, edges: Tensor | None = None) -> Tensor:
        """XGBoost input of every edge: [x_user | h_user | x_merchant | h_merchant | edge_attr];
        with ``edges`` (positions), of those edges only, the messages still passed over all.

        Call in eval mode (no dropout): training and serving compute it the same way.
        """
        if edges is None and self._plain_sage and not self.training:
            return _sage_edge_features(x_user, x_merchant, edge_index, edge_attr, self._sage_weights_list())
        rows, n = self.edge_feature_rows(x_user, x_merchant, edge_index, edge_attr, edges)
        return rows(0, n)

    @torch.no_grad()
    def edge_feature_rows(self, x_user: Tensor, x_merchant: Tensor, edge_index: Tensor, edge_attr: Tensor,
                          edges: Tensor | None = None):
        """``(rows, n)``: ``rows(start, stop)`` gives the XGBoost input of edges start..stop of
        the n edges (of ``edges`` when given), from one message passing over the whole graph. A
        large graph is scored batch by batch: its whole input (158 floats an edge; 3.9 GB for
        6.2M edges) is never in memory at once."""
        h_user, h_merchant = self.embed(x_user, x_merchant, edge_index, edge_attr=edge_attr)
        if edges is not None:
            edge_index, edge_attr = edge_index[:, edges], edge_attr[edges]

        @torch.no_grad()
        def rows(start: int, stop: int) -> Tensor:
            return _edge_features(x_user, h_user, x_merchant, h_merchant, edge_index[:, start:stop],
                                  edge_attr[start:stop])

        return rows, int(edge_index.shape[1])
