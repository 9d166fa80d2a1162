"""The ``VPDML`` member of PEFT's ``PeftType`` enum, which registering a PEFT method requires.

PEFT's ``register_peft_method`` only accepts names that are already members of its closed ``PeftType`` enum,
so a plugin must add its member first. That patch lives here, in one small tested place: drop it once PEFT
allows plugins to register new types.
"""

from __future__ import annotations

from peft.utils.peft_types import PeftType

PEFT_METHOD_NAME = "vpdml"
PREFIX = "vpdml_"


def _add_peft_type_member(name: str) -> PeftType:
    """Add ``name`` to the ``PeftType`` str-enum the way ``enum`` itself builds members (idempotent)."""
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    # Set the class attribute before the member maps: EnumType.__setattr__ refuses to rebind known members.
    type.__setattr__(PeftType, name, member)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    return member


VPDML_PEFT_TYPE: PeftType = _add_peft_type_member(PEFT_METHOD_NAME.upper())
