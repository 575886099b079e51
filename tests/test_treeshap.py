"""Exact path-dependent TreeSHAP (models/treeshap.py) against known answers."""

import itertools
import math

import numpy as np
import pytest
import shap
from enricher.models.sklearntrees import ensemble as sklearn_ensemble
from enricher.models.treeshap import MAX_PATH_FEATURES, TreeEnsemble
from sklearn.ensemble import GradientBoostingClassifier, GradientBoostingRegressor


def data(n=3000, features=8, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, features)).astype(np.float32)
    y = 2 * X[:, 0] - X[:, 1] + np.sin(3 * X[:, 2]) + 0.5 * X[:, 3] * X[:, 4]
    return X, y


@pytest.fixture(scope="module")
def regressor():
    X, y = data()
    return X, GradientBoostingRegressor(n_estimators=60, max_depth=5, random_state=0).fit(X, y)


def test_attributions_equal_shap_tree_explainer_for_a_regressor(regressor):
    X, model = regressor
    ens = sklearn_ensemble(model)
    explainer = shap.TreeExplainer(model, feature_perturbation="tree_path_dependent")
    phi, base, output = ens.explain(X[:800])
    np.testing.assert_allclose(phi, explainer.shap_values(X[:800]), rtol=0, atol=1e-6)
    np.testing.assert_allclose(base, float(np.ravel(explainer.expected_value)[0]), rtol=0, atol=1e-6)
    # additivity on every row, and the output is the model's own prediction
    assert np.abs(phi.sum(axis=1) + base - output).max() < 1e-6
    assert np.abs(output - model.predict(X[:800])).max() < 1e-6


def test_attributions_equal_shap_for_a_binary_classifier_in_margin_space():
    X, y = data(seed=1)
    model = GradientBoostingClassifier(n_estimators=40, max_depth=4, random_state=0).fit(X, y > 0)
    ens = sklearn_ensemble(model)
    phi, base, output = ens.explain(X[:500])
    np.testing.assert_allclose(phi, shap.TreeExplainer(model).shap_values(X[:500]), rtol=0, atol=1e-6)
    assert np.abs(output - model.decision_function(X[:500])).max() < 1e-6
    assert np.abs(phi.sum(axis=1) + base - output).max() < 1e-6


def _brute_force(model, x, k):
    """Shapley values of path-dependent TreeSHAP's game, by enumerating every coalition."""
    F = len(x)
    trees = [est.tree_ for est in model.estimators_[:, k]]

    def expected(tree, node, S):
        if tree.children_left[node] < 0:
            return tree.value[node, 0, 0] * model.learning_rate
        a, b = tree.children_left[node], tree.children_right[node]
        if tree.feature[node] in S:
            return expected(tree, a if x[tree.feature[node]] <= tree.threshold[node] else b, S)
        w = tree.weighted_n_node_samples
        return (w[a] * expected(tree, a, S) + w[b] * expected(tree, b, S)) / w[node]

    def v(S):
        return sum(expected(t, 0, S) for t in trees)

    phi = np.zeros(F)
    for i in range(F):
        others = [j for j in range(F) if j != i]
        for size in range(F):
            for S in itertools.combinations(others, size):
                weight = math.factorial(size) * math.factorial(F - size - 1) / math.factorial(F)
                phi[i] += weight * (v(set(S) | {i}) - v(set(S)))
    return phi, v(set())


def test_multiclass_attributions_equal_the_shapley_values_of_the_path_dependent_game():
    X, y = data(n=1500, features=5, seed=2)
    classes = np.digitize(y, [-1.0, 1.0])
    model = GradientBoostingClassifier(n_estimators=6, max_depth=3, random_state=0).fit(X, classes)
    ens = sklearn_ensemble(model)
    margins = model.decision_function(X[:12])
    chosen = margins.argmax(axis=1)
    phi, base, output = ens.explain(X[:12], chosen)
    for r in range(12):
        expected_phi, expected_value = _brute_force(model, X[r].astype(np.float64), chosen[r])
        np.testing.assert_allclose(phi[r], expected_phi, rtol=0, atol=1e-9)
        assert abs(base[r] - (expected_value + ens.init[chosen[r]])) < 1e-9
        assert abs(output[r] - margins[r, chosen[r]]) < 1e-9


def test_two_features_that_drive_the_prediction_carry_nearly_all_attribution():
    rng = np.random.default_rng(4)
    X = rng.normal(size=(4000, 10)).astype(np.float32)
    y = 3 * X[:, 2] - 2 * X[:, 7]
    model = GradientBoostingRegressor(n_estimators=80, max_depth=4, random_state=0).fit(X, y)
    phi, _, _ = sklearn_ensemble(model).explain(X[:2000])
    importance = np.abs(phi).mean(axis=0)
    assert importance[[2, 7]].sum() / importance.sum() >= 0.9


def test_the_ensemble_round_trips_through_bytes_without_pickle(regressor):
    X, model = regressor
    ens = sklearn_ensemble(model)
    again = TreeEnsemble.from_bytes(ens.to_bytes())
    np.testing.assert_array_equal(again.explain(X[:100])[0], ens.explain(X[:100])[0])


@pytest.mark.parametrize("corrupt", [
    lambda a: a["left"].__setitem__(0, len(a["left"]) + 5),  # a child outside the arrays
    lambda a: a["feature"].__setitem__(0, 99),               # a feature the rows do not have
    lambda a: a["t_unit_tab"].__setitem__(-1, a["t_unit_tab"][-1] + 8),  # a table longer than stored
    lambda a: a["t_unit_feat"].__setitem__(0, -1),
    lambda a: a["t_node_unit"].__setitem__(0, 10**6),
])
def test_arrays_that_would_read_outside_themselves_are_refused(regressor, corrupt):
    import io

    _, model = regressor
    with np.load(io.BytesIO(sklearn_ensemble(model).to_bytes()), allow_pickle=False) as z:
        arrays = {k: z[k].copy() for k in z.files}
    corrupt(arrays)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    with pytest.raises(ValueError, match="inconsistent"):
        TreeEnsemble.from_bytes(buf.getvalue())


def test_a_tree_too_deep_for_tables_is_explained_by_the_recursion_with_the_same_numbers():
    """Depth 14 on 14 features: 2^14-entry tables per leaf would pass the budget; the
    recursion explains the deep trees, the tables the shallow ones, and both equal shap."""
    rng = np.random.default_rng(5)
    X = rng.normal(size=(6000, 14)).astype(np.float32)
    y = np.sin(X[:, :7] * 2).sum(axis=1) + X[:, 7] * X[:, 8] - X[:, 9:].sum(axis=1)
    deep = GradientBoostingRegressor(n_estimators=12, max_depth=14, random_state=0).fit(X, y)
    ens = sklearn_ensemble(deep)
    assert ens.n_path_trees > 0
    phi, base, output = ens.explain(X[:200])
    np.testing.assert_allclose(phi, shap.TreeExplainer(deep).shap_values(X[:200]), rtol=0, atol=1e-9)
    np.testing.assert_allclose(output, deep.predict(X[:200]), rtol=0, atol=1e-9)
    assert np.abs(phi.sum(axis=1) + base - output).max() < 1e-9
    again = TreeEnsemble.from_bytes(ens.to_bytes())
    assert again.n_path_trees == ens.n_path_trees
    np.testing.assert_array_equal(again.explain(X[:50])[0], phi[:50])


def test_a_chain_of_more_distinct_features_than_a_mask_holds_is_explained_exactly():
    depth = MAX_PATH_FEATURES + 4  # a chain: every split on a new feature, left child a leaf
    nodes = 2 * depth + 1
    left, right = np.full(nodes, -1), np.full(nodes, -1)
    feature = np.zeros(nodes, int)
    cover = np.ones(nodes)
    value = np.zeros(nodes)
    for d in range(depth):
        node = 2 * d
        left[node], right[node], feature[node] = node + 1, node + 2, d
        cover[node] = 2.0 ** (depth - d + 1)
        cover[node + 1] = 2.0 ** (depth - d)
        cover[node + 2] = 2.0 ** (depth - d)
        value[node + 1] = d + 1.0
    value[nodes - 1] = -3.0
    ens = TreeEnsemble(left, right, feature, np.zeros(nodes), value, cover, [0, nodes], [0], [0.0],
                       n_features=depth)
    assert ens.n_path_trees == 1
    x = np.full((1, depth), 1.0)  # right at every split: the last leaf
    x[0, depth - 1] = -1.0         # ... except the last: its left leaf
    phi, base, output = ens.explain(x)
    assert output[0] == depth and abs(phi.sum() + base[0] - output[0]) < 1e-9


def test_a_wrong_matrix_is_refused(regressor):
    _, model = regressor
    with pytest.raises(ValueError, match=r"\(rows, 8\)"):
        sklearn_ensemble(model).explain(np.zeros((3, 5), np.float32))


def test_deep_trees_explained_from_several_threads_at_once_give_the_same_numbers():
    """The recursion runs on every core; the stream, the on-demand endpoint and what-if may
    call it from their own threads at the same moment (numba's default threading layer would
    abort the process on two launches at once: they are serialised)."""
    import threading

    rng = np.random.default_rng(6)
    X = rng.normal(size=(1500, 14)).astype(np.float32)
    y = np.sin(X[:, :7] * 2).sum(axis=1) + X[:, 7] * X[:, 8]
    ens = sklearn_ensemble(GradientBoostingRegressor(n_estimators=3, max_depth=13, random_state=0).fit(X, y))
    assert ens.n_path_trees > 0
    expected = ens.explain(X[:300])[0]
    results, errors = [], []

    def work():
        try:
            for _ in range(5):
                results.append(ens.explain(X[:300])[0])
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 15
    for phi in results:
        np.testing.assert_array_equal(phi, expected)


def test_an_artifact_from_before_missing_values_and_categories_still_loads_and_explains_the_same(regressor):
    """Artifacts published by the previous release hold no decision, category or tree-mode
    arrays and a two-field meta: they load as numerical splits, NaN right, float32 rows."""
    import io

    X, model = regressor
    ens = sklearn_ensemble(model)
    with np.load(io.BytesIO(ens.to_bytes()), allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    for key in ("decision", "cat_offset", "cat_words", "cat_bits", "missing", "t_tree_mode"):
        del arrays[key]
    arrays["meta"] = arrays["meta"][:2]
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    old = TreeEnsemble.from_bytes(buf.getvalue())
    assert old.precision == 32 and old.n_path_trees == 0
    np.testing.assert_array_equal(old.explain(X[:200])[0], ens.explain(X[:200])[0])
