"""Protobuf messages as Triton renders them in JSON: proto field names, and 64-bit
integers as numbers (protobuf's own JSON mapping makes them strings, which Triton's
clients do not expect in a model config)."""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

_INT64 = {
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_FIXED64,
    FieldDescriptor.TYPE_SFIXED64,
}


def _fix(descriptor: Descriptor, data: dict[str, Any]) -> None:
    for field in descriptor.fields:
        if field.name not in data:
            continue
        value = data[field.name]
        if field.message_type is not None:
            if field.message_type.GetOptions().map_entry:
                value_field = field.message_type.fields_by_name["value"]
                for k, v in value.items():
                    if value_field.message_type is not None:
                        _fix(value_field.message_type, v)
                    elif value_field.type in _INT64:
                        value[k] = int(v)
            elif isinstance(value, list):
                for item in value:
                    _fix(field.message_type, item)
            else:
                _fix(field.message_type, value)
        elif field.type in _INT64:
            data[field.name] = [int(v) for v in value] if isinstance(value, list) else int(value)


def message_to_json(message: Message) -> dict[str, Any]:
    data = json_format.MessageToDict(message, preserving_proto_field_name=True)
    _fix(message.DESCRIPTOR, data)
    return data
