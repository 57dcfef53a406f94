"""Specification of fraudlib.gnn: the heterogeneous user/merchant GNN with its edge head."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from fraudlib import gnn

U, M, FU, FM, FE, H = 5, 4, 3, 6, 2, 8


def _graph(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x_user = torch.rand(U, FU, generator=g)
    x_merchant = torch.rand(M, FM, generator=g)
    # Users 0-2 pay at merchants 0-2; user 3 only at merchant 3; user 4 nowhere.
    edge_index = torch.tensor([[0, 0, 1, 2, 2, 3], [0, 1, 1, 2, 0, 3]])
    edge_attr = torch.rand(edge_index.shape[1], FE, generator=g)
    return x_user, x_merchant, edge_index, edge_attr


def _model(layer: str = "SAGEConv", n_hops: int = 2) -> gnn.FraudGNN:
    torch.manual_seed(0)
    return gnn.FraudGNN(FU, FM, FE, hidden_channels=H, n_hops=n_hops, layer=layer, dropout_prob=0.5).eval()


@pytest.mark.parametrize("layer", sorted(gnn.LAYERS))
def test_every_layer_gives_two_logits_per_edge_and_an_embedding_per_node(layer):
    x_user, x_merchant, edge_index, edge_attr = _graph()
    logits, (h_user, h_merchant) = _model(layer)(x_user, x_merchant, edge_index, edge_attr,
                                                 return_embeddings=True)
    assert logits.shape == (edge_index.shape[1], 2)
    assert h_user.shape == (U, H) and h_merchant.shape == (M, H)


def test_the_training_containers_layer_names_are_offered():
    assert {"SAGEConv", "GraphConv", "GATConv", "GATv2Conv"} <= set(gnn.LAYERS)


def test_an_unknown_layer_is_rejected_naming_the_choices():
    with pytest.raises(ValueError, match="SAGEConv"):
        gnn.FraudGNN(FU, FM, FE, layer="NoSuchConv")


def test_n_hops_sets_the_number_of_message_passing_layers():
    assert len(_model(n_hops=3).convs) == 3


def test_a_user_embedding_depends_on_its_merchants_and_not_on_others():
    x_user, x_merchant, edge_index, _ = _graph()
    model = _model(n_hops=1)
    h_user, _ = model.embed(x_user, x_merchant, edge_index)
    changed = x_merchant.clone()
    changed[3] += 1.0  # only user 3 pays at merchant 3
    h_user_after, _ = model.embed(x_user, changed, edge_index)
    assert not torch.allclose(h_user_after[3], h_user[3])
    assert torch.allclose(h_user_after[:3], h_user[:3])


def test_two_hops_reach_the_users_of_a_users_merchants():
    x_user, x_merchant, edge_index, _ = _graph()
    changed = x_user.clone()
    changed[1] += 1.0  # user 1 shares merchant 1 with user 0
    one_hop, two_hops = _model(n_hops=1), _model(n_hops=2)
    assert torch.allclose(one_hop.embed(x_user, x_merchant, edge_index)[0][0],
                          one_hop.embed(changed, x_merchant, edge_index)[0][0])
    assert not torch.allclose(two_hops.embed(x_user, x_merchant, edge_index)[0][0],
                              two_hops.embed(changed, x_merchant, edge_index)[0][0])


def test_edge_features_are_user_then_merchant_features_and_embeddings_then_edge_features():
    x_user, x_merchant, edge_index, edge_attr = _graph()
    model = _model()
    features = model.edge_features(x_user, x_merchant, edge_index, edge_attr)
    h_user, h_merchant = model.embed(x_user, x_merchant, edge_index)
    src, dst = edge_index
    expected = torch.cat([x_user[src], h_user[src], x_merchant[dst], h_merchant[dst], edge_attr], dim=1)
    assert features.shape == (edge_index.shape[1], FU + H + FM + H + FE)
    assert torch.equal(features, expected)


def test_eval_mode_is_deterministic_and_training_mode_applies_dropout():
    inputs = _graph()
    model = _model()
    assert torch.equal(model(*inputs), model(*inputs))
    model.train()
    torch.manual_seed(1)
    first = model(*inputs)
    assert not torch.equal(first, model(*inputs))


def _random_graph(n_users: int, n_merchants: int, n_edges: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    edge_index = torch.stack([torch.randint(0, n_users, (n_edges,), generator=g),
                              torch.randint(0, n_merchants, (n_edges,), generator=g)])
    return (torch.rand(n_users, FU, generator=g), torch.rand(n_merchants, FM, generator=g), edge_index,
            torch.rand(n_edges, FE, generator=g))


def _through_heteroconv(method, inputs) -> torch.Tensor:
    """``method(*inputs)`` computed by PyG's HeteroConv/SAGEConv modules themselves."""
    model = method.__self__
    flags = model._plain_sage, model._sage_layers
    model._plain_sage = model._sage_layers = False
    try:
        return method(*inputs)
    finally:
        model._plain_sage, model._sage_layers = flags


@pytest.mark.parametrize("size", [(1, 1, 1), (U, M, 0), (40, 300, 1000), (2000, 5000, 20000)])
def test_inference_without_heteroconv_is_bitwise_what_pyg_computes(size):
    # The fast SAGEConv path serves single transactions; it must not change one bit.
    model = _model()
    assert model._plain_sage
    inputs = _random_graph(*size, seed=sum(size))
    with torch.no_grad():
        assert torch.equal(model.edge_features(*inputs), _through_heteroconv(model.edge_features, inputs))
        assert torch.equal(model(*inputs), _through_heteroconv(model.forward, inputs))
        # A neighbour sampler draws the reverse (merchant -> user) edges apart.
        rev = _random_graph(*size, seed=sum(size) + 1)[2].flip(0)
        sampled = (inputs[0], inputs[1], inputs[2], rev)
        for fast, pyg in zip(model.embed(*sampled), _through_heteroconv(model.embed, sampled)):
            assert torch.equal(fast, pyg)


def test_the_fast_path_follows_parameter_updates_and_dtype_changes_after_eval():
    inputs = _graph()
    model = _model()
    with torch.no_grad():
        model.edge_features(*inputs)  # weights gathered for the fast path
        for p in model.parameters():  # an in-place update (an optimizer step, load_state_dict)
            p.mul_(1.5)
        assert torch.equal(model.edge_features(*inputs), _through_heteroconv(model.edge_features, inputs))
        model.double()  # new parameter tensors, still in eval mode
        doubled = tuple(t.double() if t.is_floating_point() else t for t in inputs)
        features = model.edge_features(*doubled)
        assert features.dtype == torch.float64
        assert torch.equal(features, _through_heteroconv(model.edge_features, doubled))


def test_the_fast_path_is_taken_only_for_plain_sage_layers_in_eval_mode(monkeypatch):
    calls = []
    original = gnn._sage_embed
    monkeypatch.setattr(gnn, "_sage_embed", lambda *a: calls.append(len(a[-1])) or original(*a))
    inputs = _graph()
    _model("GraphConv")(*inputs)
    sage = _model()
    sage.train()(*inputs)
    assert not calls
    sage.eval()(*inputs)
    assert calls == [2 * 2 * 3]  # two hops, two directions, three weights each


def test_a_graph_without_edges_gives_no_logits():
    x_user, x_merchant, _, _ = _graph()
    logits = _model()(x_user, x_merchant, torch.zeros((2, 0), dtype=torch.long), torch.zeros((0, FE)))
    assert logits.shape == (0, 2)


def test_the_module_imports_only_torch_and_torch_geometric():
    # It is copied into every model version and must not depend on fraudlib.
    tree = ast.parse(Path(gnn.__file__).read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            roots.add(node.module.split(".")[0])
    assert roots <= {"__future__", "torch", "torch_geometric"}


# --- node inputs with the means of their edges' features ------------------------------------------

def test_edge_means_append_each_nodes_mean_of_its_edges_last_columns():
    x_user, x_merchant, edge_index, edge_attr = _graph()
    model = gnn.FraudGNN(FU, FM, FE, hidden_channels=H, edge_means=1).eval()
    xu, xm = model.node_inputs(x_user, x_merchant, edge_index, edge_attr)
    assert xu.shape == (U, FU + 1) and xm.shape == (M, FM + 1)
    assert torch.equal(xu[:, :FU], x_user) and torch.equal(xm[:, :FM], x_merchant)
    last = edge_attr[:, -1]
    assert torch.allclose(xu[0, -1], last[[0, 1]].mean())  # user 0: edges 0 and 1
    assert torch.allclose(xm[0, -1], last[[0, 4]].mean())  # merchant 0: edges 0 and 4
    assert xu[4, -1] == 0  # user 4 has no edge
    with pytest.raises(ValueError, match="pass edge_attr"):
        model.embed(x_user, x_merchant, edge_index)
    with pytest.raises(ValueError, match="edge_means"):
        gnn.FraudGNN(FU, FM, FE, edge_means=FE + 1)


def test_with_edge_means_a_users_embedding_follows_its_merchants_edges_two_hops_away():
    x_user, x_merchant, edge_index, edge_attr = _graph()
    torch.manual_seed(0)
    model = gnn.FraudGNN(FU, FM, FE, hidden_channels=H, edge_means=FE).eval()
    assert not model._plain_sage  # the compiled serving path (sage.c) does not average edge features
    with torch.no_grad():
        before = model.embed(x_user, x_merchant, edge_index, edge_attr=edge_attr)[0]
        changed = edge_attr.clone()
        changed[4] += 1.0  # user 2 -> merchant 0: user 0 pays at merchant 0 too
        after = model.embed(x_user, x_merchant, edge_index, edge_attr=changed)[0]
    assert not torch.allclose(before[0], after[0]) and torch.equal(before[3], after[3])


@pytest.mark.parametrize("size", [(1, 1, 1), (40, 300, 1000)])
def test_with_edge_means_inference_without_heteroconv_is_bitwise_what_pyg_computes(size):
    torch.manual_seed(0)
    model = gnn.FraudGNN(FU, FM, FE, hidden_channels=H, edge_means=1).eval()
    inputs = _random_graph(*size, seed=sum(size))
    with torch.no_grad():
        assert torch.equal(model.edge_features(*inputs), _through_heteroconv(model.edge_features, inputs))
