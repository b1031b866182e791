"""Server reflection that serves the contract's comments, so `grpcurl describe` shows them.

The generated modules hold descriptors without source info, and the reflection service
serializes what it finds again (`CopyToProto`), which keeps none either. `make proto` also
writes the contract as a descriptor set with source info (`projects/v1/descriptor_set.binpb`):
the files in it are answered from it, comments and all; the rest (health, reflection itself)
from the default pool, as before.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection

DESCRIPTOR_SET = resources.files("projects.v1") / "descriptor_set.binpb"


class _FileWithComments:
    """A FileDescriptor whose CopyToProto gives the file as protoc saw it, source info included."""

    def __init__(self, descriptor: Any, pool: _CommentedPool) -> None:
        self._descriptor = descriptor
        self._pool = pool
        self.name: str = descriptor.name

    @property
    def dependencies(self) -> list[Any]:
        return [self._pool.file(dependency) for dependency in self._descriptor.dependencies]

    def CopyToProto(self, proto: descriptor_pb2.FileDescriptorProto) -> None:
        original = self._pool.protos.get(self.name)
        if original is None:
            self._descriptor.CopyToProto(proto)
        else:
            proto.CopyFrom(original)


def _without_json_names(file: descriptor_pb2.FileDescriptorProto) -> Any:
    """`file` as the generated modules describe it, but for the comments: protoc's set also
    spells each field's json_name, which would turn grpcurl's output from the field names
    (what it printed before, and what scripts read) to lowerCamelCase."""
    file = descriptor_pb2.FileDescriptorProto.FromString(file.SerializeToString())
    messages = list(file.message_type)
    while messages:
        message = messages.pop()
        for field in message.field:
            field.ClearField("json_name")
        messages.extend(message.nested_type)
    return file


class _CommentedPool:
    """The lookups the reflection service makes, with files wrapped as `_FileWithComments`."""

    def __init__(self, files: descriptor_pb2.FileDescriptorSet) -> None:
        self.protos = {file.name: _without_json_names(file) for file in files.file}
        self._default = descriptor_pool.Default()

    def file(self, descriptor: Any) -> _FileWithComments:
        return _FileWithComments(descriptor, self)

    def FindFileByName(self, name: str) -> _FileWithComments:
        return self.file(self._default.FindFileByName(name))

    def FindFileContainingSymbol(self, symbol: str) -> _FileWithComments:
        return self.file(self._default.FindFileContainingSymbol(symbol))

    def __getattr__(self, name: str) -> Any:
        # Message and extension lookups return no files: the default pool's answers do.
        return getattr(self._default, name)


def enable_reflection(service_names: tuple[str, ...], server: grpc.aio.Server) -> None:
    """Serve reflection for `service_names` (and reflection itself), with comments."""
    files = descriptor_pb2.FileDescriptorSet.FromString(DESCRIPTOR_SET.read_bytes())
    pool: Any = _CommentedPool(files)  # duck-typed: the lookups the servicer makes
    reflection.enable_server_reflection((*service_names, reflection.SERVICE_NAME), server, pool)
