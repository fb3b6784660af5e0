"""Folding the BatchNormalization nodes of an ONNX graph into the Conv, Gemm or MatMul(+Add) before them.

Needs the ``onnx`` package (an optional dependency, imported when :func:`fold` is called; ``import bn_simd`` never
imports it). The maths is :func:`bn_simd.fold_conv` / :func:`bn_simd.fold_linear`, in float64.
"""
import warnings

import numpy as np

from .fold import _finish, fold_conv, fold_linear

__all__ = ["fold"]

_ONNX_DOMAINS = ("", "ai.onnx")


# BatchNormalization's epsilon when the attribute is absent: 1e-5 as the float32 attribute holds it (as runtimes use
# it), not the float64 1e-5
_EPS_DEFAULT = float(np.float32(1e-5))


def _onnx():
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as e:  # pragma: no cover  (the tests of this module skip without onnx)
        raise ImportError("bn_simd.onnx needs the onnx package (pip install onnx); the rest of bn_simd does not") \
            from e
    return onnx, numpy_helper


def _attr(node, name, default):
    from onnx import helper
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _set_attr(node, name, value):
    from onnx import helper
    for i, a in enumerate(node.attribute):
        if a.name == name:
            del node.attribute[i]
            break
    node.attribute.append(helper.make_attribute(name, value))


def _subgraphs(graph, onnx):
    """The graphs of graph's nodes' attributes (If, Loop, Scan bodies), nested ones included."""
    for node in graph.node:
        for a in node.attribute:
            for g in [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs):
                yield g
                yield from _subgraphs(g, onnx)


def _subgraph_names(graph, onnx):
    """Every value name that a subgraph (If, Loop, Scan bodies) reads: those values are used, whatever the rest."""
    names = set()
    for g in _subgraphs(graph, onnx):
        for n in g.node:
            names.update(n.input)
        names.update(o.name for o in g.output)
    return names


def _all_names(graph, onnx):
    """Every value name of graph and of its subgraphs: a new initializer's name must be none of them (a graph in
    SSA form names each value once, outer scopes included)."""
    names = set()
    for g in [graph, *_subgraphs(graph, onnx)]:
        names.update(t.name for t in g.initializer)
        names.update(t.values.name for t in g.sparse_initializer)
        names.update(v.name for v in list(g.input) + list(g.output) + list(g.value_info))
        for n in g.node:
            names.update(n.input)
            names.update(n.output)
    names.discard("")
    return names


class _ExternalData(Exception):
    """A constant stored in a file beside the model that the model was loaded without."""


def _opset(model):
    """The version of the default ONNX domain the model imports (None when it does not say)."""
    return next((o.version for o in model.opset_import if o.domain in _ONNX_DOMAINS), None)


def _training(bn, opset):
    """Whether a BatchNormalization node normalises with the batch's statistics: training_mode=1 from opset 14;
    from opset 7, outputs beyond Y (the running and saved statistics); before it, is_test=0 (the default)."""
    if opset is not None and opset >= 14:
        return bool(_attr(bn, "training_mode", 0))
    if opset is not None and opset < 7:
        return not _attr(bn, "is_test", 0)   # (is_test=0, the default, is training mode there)
    return any(o for o in bn.output[1:])


class _Graph:
    """The top-level graph's constants, producers and consumers, for the checks a fold needs."""

    def __init__(self, graph, onnx, numpy_helper):
        self.graph, self.nh, self.onnx = graph, numpy_helper, onnx
        inputs = {i.name for i in graph.input}
        # an initializer that is also a graph input is a default the caller may override: not a constant
        self.consts = {t.name: t for t in graph.initializer if t.name not in inputs}
        self.const_source = {}  # name of a Constant/Identity output -> the initializer or tensor it holds
        for node in graph.node:
            if node.domain not in _ONNX_DOMAINS:
                continue
            if node.op_type == "Constant" and len(node.output) == 1:
                t = _attr(node, "value", None)
                if t is None:  # (a float or a list of floats: a float32 scalar or vector)
                    v = _attr(node, "value_float", None)
                    vs = _attr(node, "value_floats", None) if v is None else None
                    if v is not None or vs is not None:
                        vals = [v] if v is not None else list(vs)
                        t = onnx.helper.make_tensor(node.output[0], onnx.TensorProto.FLOAT,
                                                    [] if v is not None else [len(vals)], vals)
                if t is not None:
                    self.const_source[node.output[0]] = t
            elif node.op_type == "Identity" and self._raw(node.input[0]) is not None:
                self.const_source[node.output[0]] = self._raw(node.input[0])
        self.outputs = {o.name for o in graph.output}
        self.in_subgraphs = _subgraph_names(graph, onnx)
        self.producer, self.consumers = {}, {}
        for node in graph.node:
            for o in node.output:
                self.producer[o] = node
            for i in node.input:
                if i:
                    self.consumers.setdefault(i, []).append(node)

    def const(self, name):
        """The float64-convertible ndarray of a constant value name, None if the value is not constant. A value
        marked as external data is read from memory where it is held there (raw_data), else refused (_ExternalData):
        numpy_helper would read the file relative to the working directory."""
        t = self._raw(name) if name else None
        if t is not None and self.onnx.external_data_helper.uses_external_data(t):
            if not t.HasField("raw_data"):
                raise _ExternalData(name)
            t, held = self.onnx.TensorProto(), t
            t.CopyFrom(held)
            del t.external_data[:]
            t.data_location = self.onnx.TensorProto.DEFAULT
        return None if t is None else self.nh.to_array(t)

    def _raw(self, name):
        t = self.consts.get(name)
        return self.const_source.get(name) if t is None else t

    def used(self, name):
        return bool(self.consumers.get(name)) or name in self.outputs or name in self.in_subgraphs

    def only_user(self, name, node):
        return self.consumers.get(name) == [node] and name not in self.outputs and name not in self.in_subgraphs


def _fresh(name, taken):
    k, new = 0, f"{name}_bnfold"
    while new in taken:
        k += 1
        new = f"{name}_bnfold{k}"
    taken.add(new)
    return new


def fold(model, *, training_nodes="skip"):
    """Fold BatchNormalization nodes into the Conv, Gemm or MatMul(+Add) that feeds them; returns a new
    ``onnx.ModelProto`` (the model given is not modified). ONNX Runtime (or any runtime) gives the same outputs up
    to float rounding, without the BatchNormalization nodes.

    A BatchNormalization node is folded when: its input X is the output of a Conv, a Gemm, or a MatMul (with or
    without an Add of a constant) of the default domain that nothing else reads (no other node, no graph output,
    no subgraph); its scale, B, mean and var are constants (initializers that are not graph inputs, Constant nodes,
    or Identity nodes of either: the legacy ``torch.onnx.export`` writes such Identity nodes for equal
    parameters); the layer's weight and bias are constants too; ``spatial`` is 1 (opset < 9).

    - Y = BN(Conv(x; W, B)) becomes Conv(x; W2, B2) (:func:`bn_simd.fold_conv`; any group count, depthwise
      included; B absent is 0).
    - Y = BN(alpha A'B' + beta C) becomes Gemm(A, B2, C2) with alpha = beta = 1 (:func:`bn_simd.fold_linear`;
      C absent, or of shape (), (1,), (N,) or (1, N)).
    - Y = BN(MatMul(A, W) + c) and Y = BN(MatMul(A, W)) become MatMul(A, W2) + c2 (W constant (K, N), c as C
      above), when ONNX's shape inference gives Y rank 2: BN's channel axis 1 is then the output features (on
      rank 3 and more it is not, and nothing is folded).

    Constant nodes count with a ``value`` tensor or ``value_float(s)``; a BN without ``epsilon`` uses 1e-5 as the
    float32 attribute holds it, as runtimes do. The folded node takes the BN's output name (graph outputs keep
    their names); W2, B2 are new initializers in W's dtype (a weight shared with another node is not touched; in an
    IR version 3 model they are graph inputs too, as that version requires); initializers, Constant and Identity
    nodes nothing reads any more (nor the model's training information) are removed. A chain Conv -> BN -> BN folds
    its first BN per call (call fold again for the next). Only the top-level graph is folded (If/Loop bodies are
    left as they are).
    A pair whose weight, bias or batch-norm parameters are not float16, float32 or float64 (bfloat16 ones) is left
    as it is.

    Training-mode nodes (``training_mode=1`` from opset 14; from opset 7 to 13, nodes with outputs beyond Y, the
    running and saved statistics; before opset 7, ``is_test=0``; as ``torch.onnx.export(...,
    training=TrainingMode.TRAINING)`` writes them) normalise with the batch's statistics, so folding them changes
    what the graph computes: ``training_nodes="skip"`` (default) leaves them, with a UserWarning naming them;
    ``"inference"`` folds them as the inference BatchNormalization their running mean and variance define (the
    graph as eval mode would run it), provided their running-statistics outputs are not read. Nodes with other
    outputs in use are never folded.

    Raises TypeError when model is not an ``onnx.ModelProto``, ValueError for another ``training_nodes`` or a
    BN whose values cannot be folded (naming the node; among them values stored in a file beside the model when
    the model was loaded without its external data), ImportError without the onnx package.
    """
    onnx, numpy_helper = _onnx()
    if not isinstance(model, onnx.ModelProto):
        raise TypeError(f"model must be an onnx.ModelProto, got {type(model).__name__}")
    if training_nodes not in ("skip", "inference"):
        raise ValueError(f"training_nodes must be 'skip' or 'inference', got {training_nodes!r}")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    g = _Graph(graph, onnx, numpy_helper)
    taken = _all_names(graph, onnx)
    opset = _opset(model)
    removed, new_inits, replaced, ranks, skipped_training = [], [], {}, None, []
    for bn in list(graph.node):
        if bn.op_type != "BatchNormalization" or bn.domain not in _ONNX_DOMAINS or len(bn.input) < 5:
            continue
        if _attr(bn, "spatial", 1) != 1:
            continue
        if _training(bn, opset) and training_nodes == "skip":
            skipped_training.append(bn.name or bn.output[0])
            continue
        if any(g.used(o) for o in bn.output[1:] if o):
            continue
        x = bn.input[0]
        layer = g.producer.get(x)
        if layer is None or layer.domain not in _ONNX_DOMAINS or layer.op_type not in ("Conv", "Gemm", "MatMul",
                                                                                      "Add") \
                or not g.only_user(x, bn) or layer.output[0] != x:
            continue
        if layer.op_type in ("MatMul", "Add"):
            # BN's channel axis is 1: the MatMul's output features only when that output is (M, N)
            if ranks is None:
                ranks = _ranks(model, onnx)   # the graph as given: names are not changed yet there
            if ranks.get(x) != 2:
                continue
        try:
            # (the layer's pattern and constant weight first: values a pair that cannot fold would need are not read,
            # so one stored outside the model does not refuse it)
            plan = None
            if layer.op_type in ("MatMul", "Add"):
                plan = _matmul_plan(g, layer, bn)
                if plan is None:
                    continue
            elif g._raw(layer.input[1]) is None:
                continue
            stats = [g.const(name) for name in bn.input[1:5]]
            if any(s is None or not _foldable(s) for s in stats):
                continue   # (bfloat16 parameters, allowed from BatchNormalization-15, are left as they are)
            scale, bias, mean, var = stats
            eps = float(_attr(bn, "epsilon", _EPS_DEFAULT))
            if plan is not None:
                mm, w, c, c_slot = plan
                if ranks.get(mm.output[0]) != 2:
                    continue   # the Add broadcasts a MatMul of another rank to 2: the bias's shape matters then
                w2, b2 = fold_linear(w, c, mean, var, scale, bias, eps, weight_layout="IO")
                w_name, b_name = _fresh(mm.input[1], taken), _fresh((mm.name or mm.output[0]) + "_bias", taken)
                new_inits += [numpy_helper.from_array(w2, w_name), numpy_helper.from_array(b2, b_name)]
                mm.input[1] = w_name
                if layer.op_type == "Add":
                    layer.input[c_slot] = b_name
                    layer.output[0] = bn.output[0]
                    removed.append(bn)
                else:   # a MatMul has no bias input: the BN node becomes the Add of the folded bias
                    replaced[id(bn)] = onnx.helper.make_node("Add", [x, b_name], [bn.output[0]],
                                                             name=(bn.name or bn.output[0]) + "_folded_bias")
                    removed.append(bn)
                continue
            if layer.op_type == "Conv":
                w, b = g.const(layer.input[1]), g.const(layer.input[2] if len(layer.input) > 2 else "")
                if w is None or (len(layer.input) > 2 and layer.input[2] and b is None) or not _foldable(w) or \
                        (b is not None and not _foldable(b)) or w.ndim not in (3, 4, 5):
                    continue   # (as a bfloat16 Conv: its BN is left, as those of bfloat16 Gemm and MatMul)
                w2, b2 = fold_conv(w, b, mean, var, scale, bias, eps, weight_layout="OIHW",
                                   groups=int(_attr(layer, "group", 1)))
            else:
                trans_b = int(_attr(layer, "transB", 0))
                w = g.const(layer.input[1])
                c = g.const(layer.input[2]) if len(layer.input) > 2 and layer.input[2] else np.zeros(1)
                if w is None or c is None or w.ndim != 2:
                    continue
                n_out = w.shape[0] if trans_b else w.shape[1]
                if c.shape not in ((), (1,), (n_out,), (1, n_out)):
                    continue   # a bias that varies along the batch axis is not a per-feature bias
                alpha, beta = float(_attr(layer, "alpha", 1.0)), float(_attr(layer, "beta", 1.0))
                if not _foldable(w) or not _foldable(c):
                    continue
                c_vec = np.broadcast_to(c.astype(np.float64) * beta, (1, n_out))[0]
                # alpha folded in float64 with the rest, rounded once to W's dtype
                w2, b2 = fold_linear(w.astype(np.float64) * alpha, c_vec, mean, var, scale, bias, eps,
                                     weight_layout="OI" if trans_b else "IO")
                w2, b2 = _finish(w2, b2, w.dtype, w)
                _set_attr(layer, "alpha", 1.0)
                _set_attr(layer, "beta", 1.0)
        except (ValueError, TypeError) as e:
            raise type(e)(f"cannot fold BatchNormalization node {bn.name or bn.output[0]!r}: {e}") from None
        except _ExternalData as e:
            raise ValueError(f"cannot fold BatchNormalization node {bn.name or bn.output[0]!r}: the value "
                             f"{e.args[0]!r} it needs is stored in a file beside the model, which was loaded without "
                             f"it; load the model with onnx.load(path) (its external data included), or call "
                             f"onnx.load_external_data_for_model(model, folder) first") from None
        w_name, b_name = _fresh(layer.input[1], taken), _fresh((layer.name or layer.output[0]) + "_bias", taken)
        new_inits += [numpy_helper.from_array(w2, w_name), numpy_helper.from_array(b2, b_name)]
        layer.input[1] = w_name
        if len(layer.input) > 2:
            layer.input[2] = b_name
        else:
            layer.input.append(b_name)
        layer.output[0] = bn.output[0]   # the folded node takes over the BN's output name and its readers
        removed.append(bn)
    if skipped_training:
        warnings.warn(f"bn_simd.onnx.fold: {len(skipped_training)} BatchNormalization node(s) in training mode "
                      f"(training_mode=1, or statistics outputs before opset 14: batch statistics) left as they are "
                      f"({', '.join(skipped_training[:4])}{', ...' if len(skipped_training) > 4 else ''}); "
                      f"training_nodes='inference' folds them as "
                      f"the inference batch norm of their running statistics", UserWarning, stacklevel=2)
    if not removed:
        return out
    gone = {id(bn) for bn in removed}
    nodes = [replaced.get(id(n), n) for n in graph.node if id(n) not in gone or id(n) in replaced]
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(new_inits)
    if 0 < out.ir_version < 4:  # (IR 3 and before: every initializer is a graph input too)
        graph.input.extend(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in new_inits)
    dropped = {bn.input[0] for bn in removed if id(bn) not in replaced}
    kept = [v for v in graph.value_info if v.name not in dropped]
    del graph.value_info[:]
    graph.value_info.extend(kept)
    _prune(graph, onnx, _training_reads(out, onnx))
    return out


def _training_reads(model, onnx):
    """The names the model's training information reads or binds (its graphs' inputs, update_binding's keys and
    values): initializers it names stay."""
    names = set()
    for ti in model.training_info:
        for b in ti.update_binding:
            names.update((b.key, b.value))
        for g0 in (ti.initialization, ti.algorithm):
            for g in [g0, *_subgraphs(g0, onnx)]:
                for n in g.node:
                    names.update(n.input)
    return names


def _foldable(a):
    """a is an array of a dtype the fold computes with: float16, float32 or float64 (not bfloat16, an integer...)."""
    return a.dtype.type in (np.float16, np.float32, np.float64)


def _ranks(model, onnx):
    """Rank of each value whose shape ONNX's shape inference knows ({} when inference fails)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001  (inference raises several kinds on graphs it cannot type)
        return {}
    g = inferred.graph
    return {v.name: len(v.type.tensor_type.shape.dim) for v in list(g.value_info) + list(g.output) + list(g.input)
            if v.type.HasField("tensor_type") and v.type.tensor_type.HasField("shape")}


def _matmul_plan(g, layer, bn):
    """(MatMul node, its constant weight (K, N), the constant bias (N,) or None, the Add's slot of the bias) for
    BN(MatMul(A, W) [+ c]); None when the pattern or its constants are not there."""
    c, c_slot, mm = None, None, layer
    if layer.op_type == "Add":
        slots = [i for i in (0, 1) if g._raw(layer.input[i]) is not None]
        if len(slots) != 1:
            return None
        c_slot = slots[0]
        m_name = layer.input[1 - c_slot]
        mm = g.producer.get(m_name)
        if mm is None or mm.op_type != "MatMul" or mm.domain not in _ONNX_DOMAINS or not g.only_user(m_name, layer):
            return None
        if g._raw(mm.input[1]) is None:
            return None
        c = g.const(layer.input[c_slot])
    w = g.const(mm.input[1])
    if w is None or w.ndim != 2 or not _foldable(w):
        return None
    if c is not None:
        if c.shape not in ((), (1,), (w.shape[1],), (1, w.shape[1])):
            return None   # a bias that varies along the rows is not a per-feature bias
        c = np.broadcast_to(c.astype(np.float64), (1, w.shape[1]))[0]
    return mm, w, c, c_slot


def _prune(graph, onnx, extra=frozenset()):
    """Remove initializers, Constant and Identity-of-constant nodes that nothing reads any more (nor names in
    extra: the training information's)."""
    def reads():
        return {i for n in graph.node for i in n.input} | {o.name for o in graph.output} | \
            _subgraph_names(graph, onnx) | extra

    while True:
        read = reads()
        # (an Identity of an initializer or of a Constant node's output: how exporters pass BN parameters)
        consts = {t.name for t in graph.initializer} | {o for n in graph.node if n.domain in _ONNX_DOMAINS
                                                        and n.op_type == "Constant" for o in n.output}
        dead = [n for n in graph.node if n.domain in _ONNX_DOMAINS and (
            n.op_type == "Constant" or (n.op_type == "Identity" and n.input[0] in consts))
            and not any(o in read for o in n.output)]
        for n in dead:
            graph.node.remove(n)
        read = reads()
        inputs = {i.name for i in graph.input}
        keep = [t for t in graph.initializer if t.name in read or t.name in inputs]
        if len(keep) == len(graph.initializer) and not dead:
            return
        del graph.initializer[:]
        graph.initializer.extend(keep)
