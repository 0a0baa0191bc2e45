"""The ATen op tables every family shares: views, pointwise maps, row-wise ops, dense ops.

All families match the same dialect (``torch.export``'s ATen training IR), so they classify ops
through these sets and nowhere else.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

aten = torch.ops.aten

#: ops that only re-lay the elements of one tensor (row-major order kept)
RESHAPES = frozenset({
    aten.view.default, aten.reshape.default, aten._unsafe_view.default,
    aten.flatten.using_ints, aten.unflatten.int, aten.view_as.default, aten.reshape_as.default,
})

#: ops whose result is their input, as far as values go
IDENTITY = frozenset({aten.contiguous.default, aten.clone.default, aten.alias.default,
                      aten.detach.default})

#: elementwise maps of one tensor (extra arguments are scalars)
UNARY = frozenset({
    aten.relu.default, aten.gelu.default, aten.silu.default, aten.sigmoid.default,
    aten.tanh.default, aten.hardtanh.default, aten.leaky_relu.default, aten.elu.default,
    aten.selu.default, aten.celu.default, aten.mish.default, aten.hardswish.default,
    aten.hardsigmoid.default, aten.softplus.default, aten.relu6.default, aten.neg.default,
    aten.abs.default, aten.exp.default, aten.log.default, aten.sqrt.default, aten.rsqrt.default,
    aten.square.default, aten.clamp.default, aten.clamp_min.default, aten.clamp_max.default,
    aten.pow.Tensor_Scalar, aten.to.dtype, aten._to_copy.default, aten.type_as.default,
    aten.contiguous.default, aten.clone.default, aten.alias.default, aten.erf.default,
    aten.sin.default, aten.cos.default, aten.log1p.default, aten.expm1.default,
})

#: elementwise maps of two tensors (broadcasting) or of a tensor and a scalar
BINARY = frozenset({
    aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.add.Scalar,
    aten.sub.Scalar, aten.mul.Scalar, aten.div.Scalar, aten.maximum.default,
    aten.minimum.default, aten.pow.Tensor_Tensor, aten.rsub.Scalar, aten.rsub.Tensor,
})

#: elementwise ops that draw random numbers (one per element, in memory order)
RANDOM = frozenset({
    aten.dropout.default, aten.native_dropout.default, aten.alpha_dropout.default,
    aten.bernoulli.default, aten.bernoulli.p, aten.rand_like.default, aten.randn_like.default,
})

#: ops that draw random numbers in any layout (never moved, never duplicated, never dropped)
ANY_RANDOM = RANDOM | frozenset({
    aten.feature_dropout.default, aten.feature_alpha_dropout.default, aten.randn.default,
    aten.rand.default, aten.randint.default, aten.randperm.default, aten.normal.Tensor_float,
    aten.multinomial.default,
})

#: ops over the last axis only, each row on its own: (op, index of the dim argument or None)
LAST_AXIS = {
    aten.layer_norm.default: None,
    aten.softmax.int: 1,
    aten._softmax.default: 1,
    aten.log_softmax.int: 1,
    aten._log_softmax.default: 1,
    aten.rms_norm.default: None,
    aten.glu.default: 1,
}

#: reads of sizes (metadata, not data)
METADATA = frozenset({aten.sym_size.int, aten.sym_numel.default, aten.sym_stride.int,
                      aten.size.default, aten.dim.default})

CONVS = frozenset({aten.conv1d.default, aten.conv2d.default, aten.conv3d.default,
                   aten.convolution.default, aten.conv1d.padding, aten.conv2d.padding,
                   aten.conv3d.padding})

#: products of two tensors a hand-written dense layer is spelled with (``einsum``, ``@``, ``bmm``)
PRODUCTS = frozenset({aten.einsum.default, aten.matmul.default, aten.bmm.default,
                      aten.baddbmm.default})

#: ops that only permute the axes of one tensor (a transpose of a matrix among them)
PERMUTES = frozenset({aten.t.default, aten.transpose.int, aten.permute.default,
                      aten.numpy_T.default})

CONV_TRANSPOSES = frozenset({aten.conv_transpose1d.default, aten.conv_transpose2d.input,
                             aten.conv_transpose3d.input})

#: ops that join per-step results along an axis (where a Python loop's steps meet)
JOINS = frozenset({aten.stack.default, aten.cat.default})

#: ops that cut a tensor into pieces along an axis, each piece read with ``operator.getitem``
SPLITS = frozenset({aten.unbind.int, aten.split.Tensor, aten.split_with_sizes.default,
                    aten.chunk.default, aten.unsafe_split.Tensor})

#: ops that read one position (``select``) or a slab (``slice``, ``narrow``) of one axis
PICKS = frozenset({aten.select.int, aten.slice.Tensor, aten.narrow.default})

#: dense layers on rows: ``linear(x, W(out, in), b)``, ``addmm(b, x, W(in, out))``,
#: ``mm(x, W(in, out))``, ``matmul(x, W(in, out))``
DENSE = frozenset({aten.linear.default, aten.addmm.default, aten.mm.default,
                   aten.matmul.default})

#: batch normalisation, in every form a capture records
BATCH_NORMS = frozenset({aten.batch_norm.default,
                         aten._native_batch_norm_legit_no_training.default,
                         aten._native_batch_norm_legit_functional.default,
                         aten._native_batch_norm_legit.default, aten.native_batch_norm.default})

#: dropouts called as ``(x, p, train)``: the identity when ``train`` is False or ``p`` is 0
DROPOUTS = frozenset({aten.dropout.default, aten.alpha_dropout.default,
                      aten.feature_dropout.default, aten.feature_alpha_dropout.default})


def _in_place_variants(ops: frozenset[Any]) -> dict[Any, Any]:
    """``aten.relu_.default -> aten.relu.default`` for the ops that have an in-place twin."""
    out = {}
    for op in ops:
        packet = getattr(aten, op._opname + "_", None)
        twin = getattr(packet, op._overloadname, None) if packet is not None else None
        if twin is not None:
            out[twin] = op
    return out


#: in-place twins of the elementwise maps (``relu_``, ``mul_``) -> the functional op
IN_PLACE_OF = _in_place_variants(UNARY | BINARY)


def is_op(node: Any, ops: Any) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in ops


def in_place(node: fx.Node) -> bool:
    """The op writes to one of its inputs (``relu_``, ``add_``, ``out=``)."""
    schema = getattr(node.target, "_schema", None)
    return bool(schema is not None and schema.is_mutable)


def data_users(node: fx.Node) -> list[fx.Node]:
    """Users that read the node's values (not only its sizes)."""
    return [u for u in node.users if not is_op(u, METADATA)]
