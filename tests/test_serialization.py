"""Serialization: Hypothesis round trips for every supported field type, names, upcasters, errors.

The module uses ``from __future__ import annotations`` on purpose: every annotation below is a
string that the serializer must resolve with ``typing.get_type_hints``.
"""

from __future__ import annotations

import abc
import dataclasses
import enum
import functools
import pickle
import re
from dataclasses import InitVar, dataclass, field
from datetime import UTC, date, datetime, time, timedelta, timezone
from decimal import Decimal
from typing import Any, ClassVar, Literal, NewType, Optional, Union
from uuid import UUID

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lagompy import serialization
from lagompy.errors import (
    ConfigurationError,
    DecodeError,
    EncodeError,
    RefusedValue,
    SerializationError,
    UnknownType,
)
from lagompy.serialization import (
    VERSION_KEY,
    Serializer,
    TaggedValue,
    TypeInfo,
    serializable,
    type_info,
)

# --------------------------------------------------------------------------- model


class Color(enum.Enum):
    RED = "red"
    GREEN = "green"
    BLUE = 3


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


class Mode(enum.StrEnum):
    FAST = "fast"
    SLOW = "slow"


class Perm(enum.Flag):
    R = 1
    W = 2
    X = 4


UserId = NewType("UserId", str)


@dataclass(frozen=True)
class Scalars:
    nothing: None
    flag: bool
    count: int
    ratio: float
    text: str
    blob: bytes
    user: UserId


@dataclass(frozen=True)
class Temporal:
    at: datetime
    day: date
    clock: time
    span: timedelta


@dataclass(frozen=True)
class Identifiers:
    id: UUID
    amount: Decimal


@dataclass(frozen=True)
class Enums:
    color: Color
    level: Level
    mode: Mode
    perm: Perm
    lit: Literal["a", 1, True, None, b"x", Color.RED]


@dataclass(frozen=True)
class Address:
    street: str
    city: str
    zip_code: str | None = None


@dataclass(frozen=True)
class Containers:
    var_tuple: tuple[int, ...]
    fixed: tuple[int, str, datetime]
    empty: tuple[()]
    items: list[str]
    numbers: set[int]
    tags: frozenset[str]
    by_id: dict[int, str]
    by_uuid: dict[UUID, list[Address]]
    by_pair: dict[tuple[int, str], Decimal]
    by_color: dict[Color, frozenset[int]]
    by_day: dict[date, set[time]]
    nested: list[tuple[Address, ...]]


@dataclass(frozen=True)
class Unions:
    int_or_str: int | str
    address: Optional[Address]  # noqa: UP045 - the typing spelling is under test
    when: datetime | str
    legacy: Union[int, list[str], None]  # noqa: UP007
    number: float | int | None
    raw: bytes | UUID | Decimal
    choice: Literal["x"] | Level


@dataclass(frozen=True)
class Shape:
    pass


@serializable("shapes.Circle")
@dataclass(frozen=True)
class Circle(Shape):
    radius: float


@dataclass(frozen=True)
class Square(Shape):
    side: int


@serializable(version=2, upcasters={1: lambda p: {**p, "c": p["a"]}})
@dataclass(frozen=True)
class Triangle(Shape):
    a: int
    b: int
    c: int


@dataclass(frozen=True)
class Drawing:
    main: Shape
    others: list[Shape]
    either: Circle | Square
    maybe: Circle | Square | None
    triangle: Triangle
    anything: Any
    things: list[Any]
    by_name: dict[str, Shape]
    map_or_shape: dict[str, int] | Circle


@dataclass(frozen=True)
class Tree:
    value: int
    children: tuple[Tree, ...] = ()


@dataclass
class Mutable:
    """Not frozen: still fine."""

    values: list[int]
    label: str = "x"


@dataclass(frozen=True)
class Odd:
    """ClassVar, InitVar (with default) and init=False fields."""

    KIND: ClassVar[str] = "odd"
    a: int
    scale: InitVar[int] = 2
    doubled: int = field(init=False)

    def __post_init__(self, scale: int) -> None:
        object.__setattr__(self, "doubled", self.a * scale)


@dataclass(frozen=True)
class UserRegistered:
    user_id: str
    name: str
    age: int
    address: Address
    previous: list[Address] = field(default_factory=list)


ALL_TYPES = [
    Scalars,
    Temporal,
    Identifiers,
    Enums,
    Containers,
    Unions,
    Drawing,
    Tree,
    Mutable,
    Odd,
    UserRegistered,
]


@pytest.fixture(scope="module")
def ser() -> Serializer:
    # Round trips of any string, NUL included: the refusal of NUL is tested on its own below.
    return Serializer(ALL_TYPES, allow_nul=True)


# --------------------------------------------------------------------------- strategies

INT64 = st.integers(-(2**63), 2**63 - 1)
FLOATS = st.floats(allow_nan=False)
OFFSETS = st.timedeltas(
    min_value=timedelta(hours=-24) + timedelta(microseconds=1),
    max_value=timedelta(hours=24) - timedelta(microseconds=1),
)
FIXED_TZ = st.builds(timezone, OFFSETS)
DATETIMES = st.one_of(st.datetimes(), st.datetimes(timezones=FIXED_TZ))
TIMES = st.times(timezones=st.none() | FIXED_TZ)
DECIMALS = st.decimals(allow_nan=False, allow_infinity=False)
SMALL = 3

ADDRESSES = st.builds(Address, st.text(), st.text(), st.none() | st.text())
SCALARS = st.builds(
    Scalars,
    nothing=st.none(),
    flag=st.booleans(),
    count=INT64 | st.integers(0, 2**64 - 1),
    ratio=FLOATS,
    text=st.text(),
    blob=st.binary(),
    user=st.text().map(UserId),
)
TEMPORAL = st.builds(Temporal, DATETIMES, st.dates(), TIMES, st.timedeltas())
IDENTIFIERS = st.builds(Identifiers, st.uuids(), DECIMALS)
ENUMS = st.builds(
    Enums,
    st.sampled_from(Color),
    st.sampled_from(Level),
    st.sampled_from(Mode),
    st.builds(Perm, st.integers(0, 7)),
    st.sampled_from(["a", 1, True, None, b"x", Color.RED]),
)
CONTAINERS = st.builds(
    Containers,
    var_tuple=st.lists(INT64, max_size=SMALL).map(tuple),
    fixed=st.tuples(INT64, st.text(), DATETIMES),
    empty=st.just(()),
    items=st.lists(st.text(), max_size=SMALL),
    numbers=st.sets(INT64, max_size=SMALL),
    tags=st.frozensets(st.text(), max_size=SMALL),
    by_id=st.dictionaries(INT64, st.text(), max_size=SMALL),
    by_uuid=st.dictionaries(st.uuids(), st.lists(ADDRESSES, max_size=SMALL), max_size=SMALL),
    by_pair=st.dictionaries(st.tuples(INT64, st.text()), DECIMALS, max_size=SMALL),
    by_color=st.dictionaries(st.sampled_from(Color), st.frozensets(INT64, max_size=SMALL)),
    by_day=st.dictionaries(st.dates(), st.sets(TIMES, max_size=SMALL), max_size=SMALL),
    nested=st.lists(st.lists(ADDRESSES, max_size=SMALL).map(tuple), max_size=SMALL),
)
UNIONS = st.builds(
    Unions,
    int_or_str=INT64 | st.text(),
    address=st.none() | ADDRESSES,
    when=DATETIMES | st.text(),
    legacy=st.none() | INT64 | st.lists(st.text(), max_size=SMALL),
    number=st.none() | INT64 | FLOATS,
    raw=st.binary() | st.uuids() | DECIMALS,
    choice=st.just("x") | st.sampled_from(Level),
)
CIRCLES = st.builds(Circle, FLOATS)
SQUARES = st.builds(Square, INT64)
TRIANGLES = st.builds(Triangle, INT64, INT64, INT64)
SHAPES = st.one_of(st.just(Shape()), CIRCLES, SQUARES, TRIANGLES)
ANY_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    INT64,
    FLOATS,
    st.text(),
    st.binary(),
    DATETIMES,
    st.dates(),
    st.uuids(),
    DECIMALS,
    ADDRESSES,
    SHAPES,
)
ANY_VALUES = st.recursive(
    ANY_SCALARS,
    lambda kids: (
        st.lists(kids, max_size=SMALL) | st.dictionaries(st.text() | INT64, kids, max_size=SMALL)
    ),
    max_leaves=8,
)
DRAWINGS = st.builds(
    Drawing,
    main=SHAPES,
    others=st.lists(SHAPES, max_size=SMALL),
    either=CIRCLES | SQUARES,
    maybe=st.none() | CIRCLES | SQUARES,
    triangle=TRIANGLES,
    anything=ANY_VALUES,
    things=st.lists(ANY_VALUES, max_size=SMALL),
    by_name=st.dictionaries(st.text(), SHAPES, max_size=SMALL),
    map_or_shape=st.dictionaries(st.text(), INT64, max_size=SMALL) | CIRCLES,
)
TREES = st.deferred(
    lambda: st.builds(Tree, INT64, st.lists(TREES, max_size=2).map(tuple))  # type: ignore[has-type]
)


# --------------------------------------------------------------------------- helpers


def assert_same(actual: Any, expected: Any) -> None:
    """Equal, and the same types all the way down (tuple stays tuple, offsets kept...)."""
    assert actual == expected
    check_types(actual, expected)


def check_types(actual: Any, expected: Any) -> None:
    assert type(actual) is type(expected), (actual, expected)
    if dataclasses.is_dataclass(expected):
        for f in dataclasses.fields(expected):
            check_types(getattr(actual, f.name), getattr(expected, f.name))
    elif isinstance(expected, list | tuple):
        assert len(actual) == len(expected)
        for a, e in zip(actual, expected, strict=True):
            check_types(a, e)
    elif isinstance(expected, dict):
        keys = {k: k for k in actual}
        for k, v in expected.items():
            check_types(keys[k], k)
            check_types(actual[k], v)
    elif isinstance(expected, set | frozenset):
        elements = {x: x for x in actual}
        for x in expected:
            check_types(elements[x], x)
    elif isinstance(expected, datetime | time):
        assert (actual.tzinfo is None) == (expected.tzinfo is None)
        assert actual.utcoffset() == expected.utcoffset()
        assert actual.replace(tzinfo=None) == expected.replace(tzinfo=None)
    elif isinstance(expected, Decimal):
        assert str(actual) == str(expected)


def plain_drawing() -> Drawing:
    return Drawing(Shape(), [], Square(1), None, Triangle(1, 2, 3), None, [], {}, {})


def round_trip(ser: Serializer, value: Any) -> Any:
    name, version, payload = ser.encode(value)
    assert isinstance(payload, bytes)
    back = ser.decode(name, version, payload)
    assert_same(back, value)
    return back


def raw_payload(ser: Serializer, value: Any) -> dict[Any, Any]:
    """The msgpack map of a top-level value, as plain msgpack sees it."""
    unpacked = msgpack.unpackb(ser.encode(value)[2], strict_map_key=False)
    assert isinstance(unpacked, dict)
    return unpacked


# --------------------------------------------------------------------------- round trips


@given(SCALARS)
def test_scalars_round_trip(ser: Serializer, value: Scalars) -> None:
    round_trip(ser, value)


@given(TEMPORAL)
def test_temporal_round_trip_keeps_offsets_and_naivety(ser: Serializer, value: Temporal) -> None:
    round_trip(ser, value)


@given(IDENTIFIERS)
def test_uuid_and_exact_decimal_round_trip(ser: Serializer, value: Identifiers) -> None:
    round_trip(ser, value)


@given(ENUMS)
def test_enums_and_literals_round_trip(ser: Serializer, value: Enums) -> None:
    round_trip(ser, value)


@given(CONTAINERS)
def test_containers_round_trip_with_their_own_types(ser: Serializer, value: Containers) -> None:
    round_trip(ser, value)


@given(UNIONS)
def test_unions_round_trip(ser: Serializer, value: Unions) -> None:
    round_trip(ser, value)


@given(DRAWINGS)
def test_polymorphic_and_any_fields_round_trip(ser: Serializer, value: Drawing) -> None:
    round_trip(ser, value)


@given(TREES)
def test_recursive_dataclass_round_trip(ser: Serializer, value: Tree) -> None:
    round_trip(ser, value)


@given(st.builds(UserRegistered, st.text(), st.text(), INT64, ADDRESSES, st.lists(ADDRESSES)))
def test_nested_dataclasses_round_trip(ser: Serializer, value: UserRegistered) -> None:
    round_trip(ser, value)


@given(ANY_VALUES)
def test_any_values_through_encode_value(ser: Serializer, value: Any) -> None:
    assert_same(ser.decode_value(ser.encode_value(value, Any), Any), value)


def test_aware_datetime_keeps_its_exact_offset(ser: Serializer) -> None:
    plus_two = timezone(timedelta(hours=2))
    at = datetime(2024, 5, 17, 13, 45, 12, 123456, tzinfo=plus_two)
    odd = timezone(timedelta(hours=-9, minutes=-30, seconds=-15, microseconds=-7))
    value = Temporal(at, date(1, 1, 1), time(23, 59, 59, 999999, tzinfo=odd), timedelta(-3, 7))
    back = round_trip(ser, value)
    assert back.at.utcoffset() == timedelta(hours=2)
    assert back.at.microsecond == 123456
    assert back.clock.utcoffset() == odd.utcoffset(None)
    naive = round_trip(ser, dataclasses.replace(value, at=datetime(9999, 12, 31, 23, 59, 59)))
    assert naive.at.tzinfo is None
    extreme = datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=23)))
    assert round_trip(ser, dataclasses.replace(value, at=extreme)).at == extreme


@pytest.mark.parametrize("text", ["NaN", "-sNaN", "Infinity", "-Infinity", "-0", "1.10", "1E+9"])
def test_decimal_keeps_exact_digits_and_specials(ser: Serializer, text: str) -> None:
    payload = ser.encode_value(Decimal(text), Decimal)
    assert str(ser.decode_value(payload, Decimal)) == text


def test_ambiguous_unions_follow_the_documented_rule(ser: Serializer) -> None:
    # several members on the same wire type: declaration order decides
    ann = list[int] | tuple[int, ...]
    assert ser.decode_value(ser.encode_value((1, 2), ann), ann) == [1, 2]
    # ... except that an int stays an int when a member takes ints exactly
    for number_ann in (int | float, float | int):
        back = ser.decode_value(ser.encode_value(3, number_ann), number_ann)
        assert back == 3 and type(back) is int
        back = ser.decode_value(ser.encode_value(3.0, number_ann), number_ann)
        assert back == 3.0 and type(back) is float
    # a float field accepts ints written by someone else
    assert ser.decode_value(msgpack.packb(7), float) == 7.0
    # a StrEnum member in Mode | str comes back as the enum, a plain str as str
    assert ser.decode_value(ser.encode_value(Mode.FAST, Mode | str), Mode | str) is Mode.FAST
    assert ser.decode_value(ser.encode_value("other", Mode | str), Mode | str) == "other"


def test_wire_format_of_dataclasses(ser: Serializer) -> None:
    name, version, payload = ser.encode(UserRegistered("u1", "Ann", 30, Address("s", "c")))
    assert (name, version) == ("UserRegistered", 1)
    assert msgpack.unpackb(payload) == {
        "user_id": "u1",
        "name": "Ann",
        "age": 30,
        "address": {"street": "s", "city": "c", "zip_code": None},
        "previous": [],
    }
    drawing = raw_payload(
        ser,
        Drawing(
            main=Square(2),
            others=[],
            either=Circle(1.0),
            maybe=None,
            triangle=Triangle(1, 2, 3),
            anything=None,
            things=[],
            by_name={},
            map_or_shape={"a": 1},
        ),
    )
    # a subclass in a base-class position, or a member of a union of dataclasses: tagged
    assert drawing["main"].code == drawing["either"].code == 7
    assert msgpack.unpackb(drawing["main"].data) == ["Square", 1, {"side": 2}]
    assert msgpack.unpackb(drawing["either"].data) == ["shapes.Circle", 1, {"radius": 1.0}]
    # exactly its own class and version > 1: untagged, version under the reserved key
    assert drawing["triangle"] == {"a": 1, "b": 2, "c": 3, VERSION_KEY: 2}
    assert drawing["map_or_shape"] == {"a": 1}


def test_missing_fields_get_defaults_and_unknown_fields_are_ignored(ser: Serializer) -> None:
    payload = msgpack.packb(
        {
            "extra": [1, 2],
            "age": 5,
            "name": "n",
            "user_id": "u",
            "address": {"street": "s", "city": "c"},
        }
    )
    assert ser.decode("UserRegistered", 1, payload) == UserRegistered(
        "u", "n", 5, Address("s", "c", None), []
    )


def test_classvar_initvar_and_init_false_fields(ser: Serializer) -> None:
    value = Odd(a=21)
    assert raw_payload(ser, value) == {"a": 21}
    back = round_trip(ser, value)
    assert back.doubled == 42
    assert round_trip(ser, Mutable([1, 2])) == Mutable([1, 2])


def test_initvar_without_default_is_a_configuration_error() -> None:
    @dataclass
    class NeedsInit:
        a: int
        secret: InitVar[int]

        def __post_init__(self, secret: int) -> None:
            pass

    with pytest.raises(ConfigurationError, match=r"NeedsInit\.secret"):
        Serializer([NeedsInit])


# --------------------------------------------------------------------------- names


def test_type_info_defaults_and_decorator() -> None:
    assert type_info(Square) == TypeInfo("Square", 1, {})
    assert type_info(Circle).name == "shapes.Circle"
    assert type_info(Triangle).version == 2
    assert set(type_info(Triangle).upcasters) == {1}

    @dataclass(frozen=True)
    class Child(Circle):
        pass

    assert type_info(Child).name.endswith("Child")  # not inherited from Circle

    @serializable
    @dataclass(frozen=True)
    class Bare:
        x: int

    assert type_info(Bare) == TypeInfo(Bare.__qualname__, 1, {})


def test_renamed_class_reads_data_written_under_its_stored_name() -> None:
    @serializable("billing.Invoiced")
    @dataclass(frozen=True)
    class OldInvoiced:
        amount: Decimal

    @serializable("billing.Invoiced")
    @dataclass(frozen=True)
    class InvoiceIssued:
        amount: Decimal
        currency: str = "EUR"

    name, version, payload = Serializer([OldInvoiced]).encode(OldInvoiced(Decimal("9.99")))
    assert name == "billing.Invoiced"
    reader = Serializer([InvoiceIssued])
    assert reader.type_name_of(InvoiceIssued) == "billing.Invoiced"
    assert reader.decode(name, version, payload) == InvoiceIssued(Decimal("9.99"), "EUR")


def test_class_moved_to_another_module_reads_old_payloads() -> None:
    old = dataclasses.make_dataclass("Deposited", [("amount", int)], frozen=True)
    old.__module__ = "old.module"
    new = dataclasses.make_dataclass("Deposited", [("amount", int)], frozen=True)
    new.__module__ = "new.module"
    name, version, payload = Serializer([old]).encode(old(5))
    assert name == "Deposited"
    back = Serializer([new]).decode(name, version, payload)
    assert type(back) is new
    assert back == new(5)


def test_name_collision_is_a_configuration_error_naming_both_classes() -> None:
    @serializable("dup")
    @dataclass(frozen=True)
    class First:
        a: int

    @serializable("dup")
    @dataclass(frozen=True)
    class Second:
        a: int

    ser = Serializer([First])
    with pytest.raises(ConfigurationError, match=r"First.*Second"):
        ser.register(Second)
    ser.register(First)  # the same class again is a no-op
    assert ser.is_registered(First) and not ser.is_registered(Second)


# --------------------------------------------------------------------------- upcasters

V1 = "accounts.Opened"


@serializable(V1)
@dataclass(frozen=True)
class OpenedV1:
    owner: str


def _v1_to_v2(p: dict[str, Any]) -> dict[str, Any]:
    p["steps"] = ["1->2"]
    p["holder"] = p.pop("owner")
    return p


def _v2_to_v3(p: dict[str, Any]) -> dict[str, Any]:
    return {**p, "steps": [*p["steps"], "2->3"], "currency": "EUR"}


@serializable(V1, version=3, upcasters={1: _v1_to_v2, 2: _v2_to_v3})
@dataclass(frozen=True)
class OpenedV3:
    holder: str
    currency: str
    steps: list[str]


@dataclass(frozen=True)
class HoldsV1:
    opened: OpenedV1
    shapes: list[Any] = field(default_factory=list)


@serializable("HoldsV1")
@dataclass(frozen=True)
class HoldsV3:
    opened: OpenedV3
    shapes: list[Any] = field(default_factory=list)


def test_v1_payload_goes_through_every_upcaster() -> None:
    name, version, payload = Serializer([OpenedV1]).encode(OpenedV1("ann"))
    assert (name, version) == (V1, 1)
    back = Serializer([OpenedV3]).decode(name, version, payload)
    assert back == OpenedV3("ann", "EUR", ["1->2", "2->3"])
    # a v2 payload only goes through 2->3
    v2 = msgpack.packb({"holder": "bob", "steps": ["written as v2"]})
    assert Serializer([OpenedV3]).decode(V1, 2, v2).steps == ["written as v2", "2->3"]


def test_nested_untagged_and_tagged_values_are_upcast() -> None:
    old = Serializer([HoldsV1])
    name, version, payload = old.encode(HoldsV1(OpenedV1("ann"), shapes=[OpenedV1("bob")]))
    new = Serializer([HoldsV3])
    back = new.decode(name, version, payload)
    assert back.opened == OpenedV3("ann", "EUR", ["1->2", "2->3"])
    assert back.shapes == [OpenedV3("bob", "EUR", ["1->2", "2->3"])]
    # and the new writer stores the nested version, which the new reader reads without upcasting
    current = HoldsV3(OpenedV3("c", "USD", []), [OpenedV3("d", "USD", [])])
    assert raw_payload(new, current)["opened"][VERSION_KEY] == 3
    assert new.decode(*new.encode(current)) == current


def test_upcasters_see_raw_decoded_values() -> None:
    seen: list[dict[str, Any]] = []

    def record(p: dict[str, Any]) -> dict[str, Any]:
        seen.append(dict(p))
        return p

    @serializable("Recorded")
    @dataclass(frozen=True)
    class RecordedV1:
        at: datetime
        where: Address
        shape: Shape

    @serializable("Recorded", version=2, upcasters={1: record})
    @dataclass(frozen=True)
    class RecordedV2:
        at: datetime
        where: Address
        shape: Shape

    at = datetime(2020, 1, 2, tzinfo=UTC)
    encoded = Serializer([RecordedV1, Circle]).encode(
        RecordedV1(at, Address("s", "c"), Circle(1.5))
    )
    back = Serializer([RecordedV2, Circle]).decode(*encoded)
    assert back == RecordedV2(at, Address("s", "c"), Circle(1.5))
    assert seen == [
        {
            "at": at,
            "where": {"street": "s", "city": "c", "zip_code": None},
            "shape": TaggedValue("shapes.Circle", 1, {"radius": 1.5}),
        }
    ]


def test_missing_upcaster_is_a_decode_error_naming_type_and_versions() -> None:
    @serializable(V1, version=3, upcasters={2: _v2_to_v3})
    @dataclass(frozen=True)
    class OnlyFromV2:
        holder: str
        currency: str
        steps: list[str]

    payload = Serializer([OpenedV1]).encode(OpenedV1("ann"))[2]
    with pytest.raises(DecodeError, match=r"accounts\.Opened.*version 1.*from version 1 to 2"):
        Serializer([OnlyFromV2]).decode(V1, 1, payload)


def test_newer_version_than_known_is_a_decode_error() -> None:
    v3 = Serializer([OpenedV3])
    name, version, payload = v3.encode(OpenedV3("a", "EUR", []))
    with pytest.raises(DecodeError, match=r"version 3 is newer"):
        Serializer([OpenedV1]).decode(name, version, payload)
    # also for a nested value that carries its version
    nested = Serializer([HoldsV3]).encode(HoldsV3(OpenedV3("a", "EUR", [])))
    with pytest.raises(DecodeError, match=r"HoldsV1\.opened: version 3 is newer"):
        Serializer([HoldsV1]).decode(*nested)


def test_failing_upcaster_is_a_decode_error() -> None:
    @serializable(V1, version=2, upcasters={1: lambda p: p["nope"]})
    @dataclass(frozen=True)
    class Broken:
        holder: str

    payload = Serializer([OpenedV1]).encode(OpenedV1("ann"))[2]
    with pytest.raises(DecodeError, match=r"upcaster from version 1 to 2 raised KeyError"):
        Serializer([Broken]).decode(V1, 1, payload)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"version": 0}, "version"),
        ({"version": 2, "upcasters": {2: _v2_to_v3}}, r"upcasters\[2\]"),
        ({"version": 2, "upcasters": {0: _v2_to_v3}}, r"upcasters\[0\]"),
        ({"version": 2, "upcasters": {1: "not callable"}}, "not callable"),
    ],
)
def test_serializable_validates_its_arguments(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        serializable("x", **kwargs)


# --------------------------------------------------------------------------- errors


def test_unknown_type_name(ser: Serializer) -> None:
    with pytest.raises(UnknownType) as info:
        ser.decode("no.such.Type", 1, msgpack.packb({}))
    assert info.value.type_name == "no.such.Type"


def test_unknown_nested_tagged_type_is_unknown_type(ser: Serializer) -> None:
    tagged = msgpack.ExtType(7, msgpack.packb(["gone.Shape", 1, {}]))
    raw = {**raw_payload(ser, plain_drawing()), "anything": tagged}
    with pytest.raises(UnknownType, match=r"Drawing\.anything: unknown type name 'gone\.Shape'"):
        ser.decode("Drawing", 1, msgpack.packb(raw))


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\xc1",  # never used in msgpack
        msgpack.packb({"value": 1}) + b"\x00",  # trailing garbage
        msgpack.packb([1, 2]),  # not a map
        msgpack.packb({"value": msgpack.ExtType(1, b"\x00")}),  # broken datetime extension
    ],
)
def test_garbage_is_a_decode_error(ser: Serializer, payload: bytes) -> None:
    with pytest.raises(DecodeError, match=r"^Tree"):
        ser.decode("Tree", 1, payload)


def test_wrong_field_type_names_the_field_path(ser: Serializer) -> None:
    good = raw_payload(ser, UserRegistered("u", "n", 1, Address("s", "c"), [Address("a", "b")]))
    cases = [
        ({**good, "address": {"street": "s", "city": 3}}, r"UserRegistered\.address\.city: "),
        ({**good, "age": "old"}, r"UserRegistered\.age: expected int, got str"),
        ({**good, "age": True}, r"UserRegistered\.age: expected int, got bool"),
        (
            {**good, "previous": [{"street": "s", "city": "c"}, {"city": "x"}]},
            r"UserRegistered\.previous\[1\]\.street: missing required field",
        ),
        ({**good, "previous": "nope"}, r"UserRegistered\.previous: expected list\[Address\]"),
    ]
    for payload, message in cases:
        with pytest.raises(DecodeError, match=message):
            ser.decode("UserRegistered", 1, msgpack.packb(payload))
    with pytest.raises(DecodeError, match=r"UserRegistered\.address\.city: expected str, got int"):
        ser.decode("UserRegistered", 1, msgpack.packb(cases[0][0]))
    bad_key = {**raw_payload(ser, Tree(1)), "children": [{"value": "x"}]}
    with pytest.raises(DecodeError, match=r"Tree\.children\[0\]\.value: expected int, got str"):
        ser.decode("Tree", 1, msgpack.packb(bad_key))


def test_wrong_value_at_encode_time_names_the_field_path(ser: Serializer) -> None:
    bad = UserRegistered("u", "n", 1, Address("s", 3))  # type: ignore[arg-type]
    with pytest.raises(EncodeError, match=r"UserRegistered\.address\.city: expected str, got int"):
        ser.encode(bad)
    with pytest.raises(EncodeError, match=r"Containers\.by_id\[1\]: expected str"):
        empty = Containers(
            (), (1, "", datetime(2000, 1, 1)), (), [], set(), frozenset(), {}, {}, {}, {}, {}, []
        )
        ser.encode(dataclasses.replace(empty, by_id={1: 2}))  # type: ignore[dict-item]
    with pytest.raises(EncodeError, match=r"Drawing\.anything: .*tuple"):
        ser.encode(dataclasses.replace(plain_drawing(), anything=(1,)))


def test_unsupported_annotation_names_class_and_field() -> None:
    @dataclass(frozen=True)
    class Weird:
        ok: int
        number: complex

    with pytest.raises(ConfigurationError, match=r"Weird\.number.*complex"):
        Serializer([Weird])

    @dataclass(frozen=True)
    class Deep:
        items: list[dict[str, complex]]

    with pytest.raises(ConfigurationError, match=r"Deep\.items.*complex"):
        Serializer().register(Deep)

    @dataclass(frozen=True)
    class BadKey:
        by_address: dict[Address, int]

    with pytest.raises(ConfigurationError, match=r"BadKey\.by_address.*map key"):
        Serializer([BadKey])

    class Planet(enum.Enum):
        EARTH = (1, 2)

    with pytest.raises(ConfigurationError, match=r"Planet\.EARTH"):
        Serializer().register(Planet)


@dataclass(frozen=True)
class BrokenInner:
    number: complex


@dataclass(frozen=True)
class BrokenOuter:
    address: Address
    inner: BrokenInner


def test_failed_registration_registers_nothing() -> None:
    ser = Serializer()
    with pytest.raises(ConfigurationError, match=r"BrokenInner\.number"):
        ser.register(BrokenOuter)
    assert not ser.is_registered(BrokenOuter)
    assert not ser.is_registered(Address)


def test_encoding_an_unregistered_class_is_an_encode_error(ser: Serializer) -> None:
    @dataclass(frozen=True)
    class Stranger:
        a: int

    with pytest.raises(EncodeError, match=r"Stranger is not registered"):
        ser.encode(Stranger(1))
    drawing = plain_drawing()
    with pytest.raises(EncodeError, match=r"Drawing\.anything: .*Stranger is not registered"):
        ser.encode(dataclasses.replace(drawing, anything=Stranger(1)))
    with pytest.raises(EncodeError, match=r"Drawing\.main: expected Shape, got .*Stranger"):
        ser.encode(dataclasses.replace(drawing, main=Stranger(1)))  # type: ignore[arg-type]
    with pytest.raises(EncodeError, match="only registered dataclasses"):
        ser.encode(42)
    assert not ser.is_registered(Stranger)
    with pytest.raises(ConfigurationError):
        ser.type_name_of(Stranger)


def test_all_errors_are_serialization_errors(ser: Serializer) -> None:
    for call in (
        lambda: ser.decode("nope", 1, b""),
        lambda: ser.decode("Tree", 1, b"\xc1"),
        lambda: ser.encode(object()),
        lambda: ser.decode_value(b"\x01", str),
    ):
        with pytest.raises(SerializationError):
            call()


# --------------------------------------------------------------------------- replies


@pytest.mark.parametrize(
    ("value", "annotation"),
    [
        (None, None),
        (None, type(None)),
        (42, int),
        ("done", str),
        (Address("s", "c"), Address),
        ([Address("s", "c"), Address("t", "d", "123")], list[Address]),
        (None, Optional[Address]),  # noqa: UP045
        (Address("s", "c"), Address | None),
        (7, int | None),
        (OpenedV3("a", "EUR", []), OpenedV3),
        (Circle(1.0), Shape),
        ({"a": (1, 2)}, dict[str, tuple[int, ...]]),
    ],
)
def test_encode_value_and_decode_value_for_replies(value: Any, annotation: Any) -> None:
    ser = Serializer()
    ser.register(Circle)
    payload = ser.encode_value(value, annotation)
    assert_same(ser.decode_value(payload, annotation), value)


def test_decode_value_errors_name_the_annotation_and_path() -> None:
    ser = Serializer()
    payload = msgpack.packb([{"street": "s", "city": "c"}, {"street": 1, "city": "c"}])
    with pytest.raises(DecodeError, match=r"list\[Address\]\[1\]\.street: expected str, got int"):
        ser.decode_value(payload, list[Address])
    with pytest.raises(EncodeError, match=r"int \| None: expected int, got str"):
        ser.encode_value("x", int | None)
    assert ser.is_registered(Address)  # registered on the fly by decode_value


def test_register_annotation_registers_reachable_dataclasses() -> None:
    ser = Serializer()
    ser.register(dict[str, list[Circle | Square]] | None)
    assert ser.is_registered(Circle) and ser.is_registered(Square)
    assert ser.type_name_of(Circle) == "shapes.Circle"
    with pytest.raises(ConfigurationError, match="complex"):
        ser.register(list[complex])


# --------------------------------------------------------------------------- NUL characters

STRICT = Serializer(ALL_TYPES)
LENIENT = Serializer(ALL_TYPES, allow_nul=True)
EVERYTHING = st.one_of(SCALARS, ENUMS, CONTAINERS, UNIONS, DRAWINGS, ADDRESSES)


def holds_nul(value: Any) -> bool:
    """True if a string with a NUL character sits anywhere in ``value``."""
    if isinstance(value, str):
        return "\x00" in value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return any(holds_nul(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init)
    if isinstance(value, dict):
        return any(holds_nul(k) or holds_nul(x) for k, x in value.items())
    if isinstance(value, list | tuple | set | frozenset):
        return any(holds_nul(x) for x in value)
    return False


@given(EVERYTHING)
def test_a_nul_anywhere_is_refused_and_nothing_else_changes(value: Any) -> None:
    if holds_nul(value):
        with pytest.raises(EncodeError, match="contains a NUL character"):
            STRICT.encode(value)
        round_trip(LENIENT, value)
    else:
        assert STRICT.encode(value) == LENIENT.encode(value)


@dataclass(frozen=True)
class Note:
    title: str
    lines: list[str]
    labels: dict[str, str]
    extra: Any
    subtitle: str | None
    pair: tuple[str, int]
    either: str | int


def note(**changes: Any) -> Note:
    fine = Note("t", ["l"], {"k": "v"}, {"x": ["y"]}, None, ("p", 1), 1)
    return dataclasses.replace(fine, **changes)


@pytest.mark.parametrize(
    ("value", "path"),
    [
        (note(title="ti\x00tle"), "Note.title: the string 'ti\\x00tle' contains a NUL character "
         "(\\x00 at index 2)"),
        (note(lines=["a", "b\x00"]), "Note.lines[1]: the string"),
        (note(labels={"k\x00": "v"}), "Note.labels<key 'k\\x00'>: the string"),
        (note(labels={"k": "\x00"}), "Note.labels['k']: the string"),
        (note(extra={"z": ["w\x00"]}), "Note.extra['z'][0]: the string"),
        (note(subtitle="\x00"), "Note.subtitle: the string"),
        (note(pair=("\x00", 1)), "Note.pair[0]: the string"),
        (note(either="\x00"), "Note.either: the string"),
    ],
)  # fmt: skip
def test_a_nul_character_is_refused_naming_the_field(value: Note, path: str) -> None:
    strict = Serializer([Note])
    with pytest.raises(EncodeError) as refused:
        strict.encode(value)
    assert str(refused.value).startswith(path)
    assert "PostgreSQL text columns refuse" in str(refused.value)
    with pytest.raises(EncodeError, match=r"^str: the string 'a\\x00' contains a NUL"):
        strict.encode_value("a\x00", str)
    # Allowed, it round trips; data written so decodes with any serializer.
    lenient = Serializer([Note], allow_nul=True)
    encoded = lenient.encode(value)
    assert lenient.decode(*encoded) == value == strict.decode(*encoded)


def test_allow_nul_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from lagompy.serialization import SerializerSettings

    assert Serializer().allow_nul is False and SerializerSettings().allow_nul is False
    monkeypatch.setenv("LAGOMPY_SERIALIZER_ALLOW_NUL", "true")
    assert Serializer().allow_nul is True
    assert Serializer(allow_nul=False).allow_nul is False  # a keyword argument wins
    assert Serializer([Note]).encode(note(title="\x00"))[0] == "Note"


# --------------------------------------------------------------------------- construction


@functools.cache
def slow_serializer() -> Serializer:
    """A serializer that builds every dataclass by calling it (no direct __dict__ fill)."""
    with pytest.MonkeyPatch.context() as m:
        m.setattr(serialization, "_plain_init", lambda cls: False)
        return Serializer(ALL_TYPES, allow_nul=True)


def hash_of(value: Any) -> Any:
    try:
        return hash(value)
    except TypeError as e:  # a frozen dataclass holding a list
        return str(e)


def assert_built_alike(fast: Any, slow: Any) -> None:
    """Equal, same types down the tree, and every dataclass instance alike: the same instance
    attributes, hash (frozen ones), repr and pickled round trip."""
    assert_same(fast, slow)
    if dataclasses.is_dataclass(slow) and not isinstance(slow, type):
        assert vars(fast) == vars(slow)
        assert list(vars(fast)) == list(vars(slow))
        assert repr(fast) == repr(slow)
        assert pickle.loads(pickle.dumps(fast)) == slow
        assert hash_of(fast) == hash_of(slow)
        for f in dataclasses.fields(slow):
            assert_built_alike(getattr(fast, f.name), getattr(slow, f.name))
    elif isinstance(slow, list | tuple):
        for a, b in zip(fast, slow, strict=True):
            assert_built_alike(a, b)
    elif isinstance(slow, dict):
        for k, v in slow.items():
            assert_built_alike(fast[k], v)


@given(st.one_of(EVERYTHING, TEMPORAL, IDENTIFIERS, TREES, st.builds(Odd, INT64)))
def test_dataclasses_filled_directly_equal_those_built_by_their_init(value: Any) -> None:
    name, version, payload = LENIENT.encode(value)
    assert slow_serializer().encode(value) == (name, version, payload)
    assert_built_alike(
        LENIENT.decode(name, version, payload), slow_serializer().decode(name, version, payload)
    )


def test_only_dataclasses_whose_init_just_stores_its_arguments_are_filled_directly() -> None:
    @dataclass(frozen=True)
    class Plain:
        a: int
        b: list[int] = field(default_factory=list)

    @dataclass
    class PlainMutable:
        a: int

    @dataclass(frozen=True, slots=True)
    class Slotted:
        a: int

    @dataclass(frozen=True)
    class Checked:
        a: int

        def __post_init__(self) -> None:
            if self.a < 0:
                raise ValueError("negative")

    @dataclass(frozen=True)
    class OwnInit:
        a: int

        def __init__(self, a: int) -> None:
            object.__setattr__(self, "a", abs(a))

    @dataclass
    class Watched:
        a: int

        def __setattr__(self, name: str, value: Any) -> None:
            object.__setattr__(self, name, value * 2)

    class Doubling:
        def __set_name__(self, owner: type, name: str) -> None:
            self.name = "_" + name

        def __get__(self, obj: Any, owner: type | None = None) -> Any:
            return 0 if obj is None else getattr(obj, self.name)

        def __set__(self, obj: Any, value: int) -> None:
            object.__setattr__(obj, self.name, value * 2)

    @dataclass
    class Described:
        a: int = Doubling()  # type: ignore[assignment]

    class Counting(type):
        built = 0

        def __call__(cls, *args: Any, **kwargs: Any) -> Any:
            Counting.built += 1
            return super().__call__(*args, **kwargs)

    @dataclass(frozen=True)
    class Counted(metaclass=Counting):
        a: int

    @dataclass(frozen=True)
    class Abstract(abc.ABC):
        a: int

        @abc.abstractmethod
        def area(self) -> int: ...

    @dataclass(frozen=True)
    class Derived(Plain):
        c: int = 0

    plain = serialization._plain_init
    assert plain(Plain) and plain(PlainMutable) and plain(Derived)
    assert not plain(Slotted) and not plain(Checked) and not plain(OwnInit)
    assert not plain(Watched) and not plain(Described) and not plain(Odd)
    assert not plain(Counted) and plain(Abstract)

    ser = Serializer([Checked, OwnInit, Watched, Described, Slotted, Counted, Abstract])
    with pytest.raises(DecodeError, match="negative"):
        ser.decode(ser.type_name_of(Checked), 1, msgpack.packb({"a": -1}))
    assert ser.decode(ser.type_name_of(OwnInit), 1, msgpack.packb({"a": -3})) == OwnInit(3)
    assert ser.decode(ser.type_name_of(Watched), 1, msgpack.packb({"a": 2})).a == 4
    assert ser.decode(ser.type_name_of(Described), 1, msgpack.packb({"a": 2})).a == 4
    assert ser.decode(ser.type_name_of(Slotted), 1, msgpack.packb({"a": 2})) == Slotted(2)
    assert ser.decode(ser.type_name_of(Counted), 1, msgpack.packb({"a": 2})) == Counted(2)
    assert Counting.built == 2  # the decoded one and the one it is compared with
    # Filled in directly or built by calling it, an abstract class is a DecodeError all the same.
    with pytest.raises(
        DecodeError, match=r"Abstract\(\.\.\.\) raised TypeError: Can't instantiate"
    ):
        ser.decode(ser.type_name_of(Abstract), 1, msgpack.packb({"a": 2}))


# --------------------------------------------------------------------------- 64-bit integers


@dataclass(frozen=True)
class Sixty4:
    n: int
    ns: tuple[int, ...] = ()
    by_name: dict[str, int] = field(default_factory=dict)


def test_integers_beyond_64_bits_are_refused_naming_where_they_are() -> None:
    """msgpack stores -2**63 to 2**64 - 1: at both ends a value round-trips, one step beyond it
    is a RefusedValue (bad input: a service answers 422) naming the field, not the packer's
    bare OverflowError."""
    s = Serializer([Sixty4])
    for edge in (-(2**63), 2**64 - 1):
        value = Sixty4(edge, (edge,), {"k": edge})
        assert s.decode(*s.encode(value)) == value
        assert s.decode_value(s.encode_value(edge, int), int) == edge
    cases = [
        (Sixty4(2**64), "Sixty4.n = 18446744073709551616"),
        (Sixty4(1, (0, -(2**63) - 1)), "Sixty4.ns[1] = -9223372036854775809"),
        (Sixty4(1, (), {"k": 10**30}), "Sixty4.by_name['k'] = 1000000000000000000000000000000"),
    ]
    for value, where in cases:
        with pytest.raises(RefusedValue, match=re.escape(f"the integer {where} is outside")):
            s.encode(value)
    with pytest.raises(RefusedValue, match="the integer value = 18446744073709551616"):
        s.encode_value(2**64, int)
    with pytest.raises(RefusedValue, match=r"the integer value\[0\] = "):
        s.encode_value([2**70], list[int])
