"""What every samg custom op shares: its declaration, the onnx.defs schema, the model-local function
body attached or stripped, a standalone one-node model, and the torch autograd.Function whose
`symbolic` emits exactly one node under the TorchScript exporter.

`samg::GuidanceCombine` (samg.op) and `samg::SemanticCombine` (samg.scfg.op) are each one `OpSpec`
plus their own function body and reference. Importing this module is cheap: onnx and torch are
imported by the methods that need them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable

from samg.errors import SamgError, require

# What onnxruntime 1.31 reads (onnx 1.23 writes IR 14 by default).
STANDALONE_IR_VERSION = 10
# ONNX type strings of the prediction inputs and outputs.
TENSOR_TYPES = ("tensor(float)", "tensor(float16)", "tensor(bfloat16)")


@dataclass(frozen=True)
class OpSpec:
    """One custom op: names, formal parameters and attributes, and how to build its function body.

    inputs / outputs: (name, type or type-constraint name, description); attributes: (name, default,
    description), the default's type (float or int) is the attribute's; body(opset) -> FunctionProto."""

    domain: str
    op_type: str
    version: int
    doc: str
    inputs: tuple[tuple[str, str, str], ...]
    outputs: tuple[tuple[str, str, str], ...]
    type_constraints: tuple[tuple[str, tuple[str, ...], str], ...]
    attributes: tuple[tuple[str, Any, str], ...]
    body: Callable[[int], Any]
    infer: Callable[[Any], None] | None = None

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(name for name, _, _ in self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(name for name, _, _ in self.outputs)

    @property
    def defaults(self) -> dict[str, Any]:
        return {name: default for name, default, _ in self.attributes}

    # -- ONNX ----------------------------------------------------------------------------------
    def register_schema(self) -> None:
        """Register the op schema with onnx.defs (idempotent), for the checker and dynamo exporter."""
        onnx = require("onnx", f"to describe the {self.op_type} op")
        defs = onnx.defs
        if defs.has(self.op_type, self.version, self.domain):
            return
        schema_cls = defs.OpSchema
        param = schema_cls.FormalParameter
        schema = schema_cls(
            self.op_type, self.domain, self.version, self.doc,
            inputs=[param(name, kind, doc) for name, kind, doc in self.inputs],
            outputs=[param(name, kind, doc) for name, kind, doc in self.outputs],
            type_constraints=[(name, list(types), doc) for name, types, doc in self.type_constraints],
            attributes=[schema_cls.Attribute(name, onnx.helper.make_attribute(name, default), doc)
                        for name, default, doc in self.attributes],
        )
        if self.infer is not None:
            schema.set_type_and_shape_inference_function(self.infer)
        register_once(schema)

    def attach_function(self, model) -> None:
        """Add the op's body (built for the model's own opset) and the domain's opset import, in place."""
        attach_function_body(model, self.body(default_opset(model)), domain=self.domain, version=self.version)

    def strip_function(self, model) -> None:
        """Remove the op's body so runtimes use their plugin/custom op instead (in place)."""
        strip_function_body(model, domain=self.domain, name=self.op_type)

    def standalone_model(self, inputs: list, outputs: list, *, opset: int, with_function: bool = True,
                         node_name: str | None = None, **attributes):
        """A model holding one node of this op (value infos `inputs`/`outputs`), body attached unless
        `with_function=False` (the plugin / custom-op library path)."""
        helper = require("onnx", f"to build a {self.op_type} model").helper
        self.register_schema()
        node = helper.make_node(self.op_type, list(self.input_names), list(self.output_names), domain=self.domain,
                                **({"name": node_name} if node_name else {}), **attributes)
        graph = helper.make_graph([node], node_name or self.op_type, inputs, outputs)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset),
                                                        helper.make_opsetid(self.domain, self.version)])
        model.ir_version = STANDALONE_IR_VERSION
        if with_function:
            self.attach_function(model)
        return model

    # -- torch -----------------------------------------------------------------------------------
    def export_function(self, reference: Callable[..., Any], *, untraced: bool = False):
        """A torch.autograd.Function: forward = `reference(*tensors, *attribute values)`; under the
        TorchScript exporter its `symbolic` emits one node of this op (typed attributes, output typed
        like the first input). `untraced`: compute forward outside the tracer (a reference whose many
        ops would otherwise be recorded as the node's subgraph)."""
        return _export_function(self, reference, untraced)


@functools.cache
def _export_function(spec: OpSpec, reference: Callable[..., Any], untraced: bool):
    torch = require("torch", f"to export {spec.op_type}")
    n_inputs = len(spec.inputs)
    suffixes = [(name, "f" if isinstance(default, float) else "i") for name, default, _ in spec.attributes]

    class CustomOpFunction(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *args):
            if not untraced:
                return reference(*args)
            state = torch._C._get_tracing_state()
            torch._C._set_tracing_state(None)
            try:
                return reference(*args)
            finally:
                torch._C._set_tracing_state(state)

        @staticmethod
        def symbolic(g, *args):
            tensors, values = args[:n_inputs], args[n_inputs:]
            attrs = {f"{name}_{kind}": (float(v) if kind == "f" else int(v)) for (name, kind), v in zip(suffixes, values)}
            out = g.op(f"{spec.domain}::{spec.op_type}", *tensors, **attrs)
            # Same dtype and shape as the first input, so the exporter keeps full type information.
            out.setType(tensors[0].type())
            return out

    CustomOpFunction.__name__ = CustomOpFunction.__qualname__ = f"{spec.op_type}Function"
    return CustomOpFunction


# -- model-local function bodies ------------------------------------------------------------------


def default_opset(model) -> int:
    """The model's default-domain opset (a function body must be built for it)."""
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    raise SamgError("the ONNX model has no default-domain opset import: re-export it with opset 17 or 18")


def attach_function_body(model, body, *, domain: str, version: int) -> None:
    """Add a model-local function `body` and its domain's opset import to `model` in place,
    replacing an earlier body of the same op (so attaching twice is harmless)."""
    strip_function_body(model, domain=body.domain, name=body.name)
    model.functions.append(body)
    if not any(entry.domain == domain for entry in model.opset_import):
        entry = model.opset_import.add()
        entry.domain = domain
        entry.version = version
    # Model-local functions need IR >= 8 (IR >= 9 for the attribute defaults in the body).
    model.ir_version = max(model.ir_version, 9)


def strip_function_body(model, *, domain: str, name: str) -> None:
    """Remove the model-local function `domain::name` in place (runtimes then need a plugin/custom op)."""
    keep = [f for f in model.functions if not (f.domain == domain and f.name == name)]
    if len(keep) != len(model.functions):
        del model.functions[:]
        model.functions.extend(keep)


def register_once(schema) -> None:
    """Register an op schema with onnx.defs unless one of that name, version and domain exists."""
    defs = require("onnx", "to register op schemas").defs
    name, version, domain = schema.name, schema.since_version, schema.domain
    if defs.has(name, version, domain):
        return
    try:
        defs.register_schema(schema)
    except Exception as exc:  # a concurrent registration of the same schema is fine
        if not defs.has(name, version, domain):
            raise SamgError(f"could not register the {domain}::{name} schema with onnx: {exc}") from exc
