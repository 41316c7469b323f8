"""The wire protocol as pure functions (PROTOCOL.md §1-2): exact bytes, exact numbers.

Expected values are computed independently (by hand or with Decimal), never with the
code under test.
"""

from __future__ import annotations

from decimal import ROUND_DOWN, Decimal

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from herd_trio.protocol import (
    Iamat,
    ProtocolError,
    Record,
    Whatsat,
    at_parts,
    canonical_at,
    check_coords,
    format_at,
    format_skew,
    later,
    make_record,
    parse_at,
    parse_at_fields,
    parse_command,
    parse_command_fields,
    parse_coords,
    parse_time,
    question,
    time_ns,
)
from herd_trio.store import pack

WHITESPACE = b" \t\n\v\f\r"
NOT_SEPARATORS = [
    pytest.param(b"\xc2\xa0", id="U+00A0-utf8"),
    pytest.param(b"\xa0", id="xa0-byte"),
    pytest.param("\u2003".encode(), id="U+2003-utf8"),
    pytest.param(b"\x1c", id="x1c"),
    pytest.param(b"\x85", id="x85"),
]
KIWI = b"IAMAT kiwi.cs.ucla.edu +34.068930-118.445127 1621464827.959498503"


def ns_of(seconds: str) -> int:
    """Independent oracle: POSIX seconds as a string -> whole nanoseconds, truncated."""
    return int((Decimal(seconds) * 10**9).to_integral_value(rounding=ROUND_DOWN))


def skew_of(received_ns: int, client_time: str) -> bytes:
    """Independent oracle for AT field 3, via Decimal arithmetic and string formatting."""
    diff = (Decimal(received_ns) - Decimal(ns_of(client_time))) / Decimal(10**9)
    text = f"{diff:.9f}"
    return (text if text.startswith("-") else "+" + text).encode()


# --- IAMAT -------------------------------------------------------------------------------


def test_iamat_fields_are_parsed_exactly() -> None:
    command = parse_command(KIWI)
    assert command == Iamat(
        client=b"kiwi.cs.ucla.edu",
        coords=b"+34.068930-118.445127",
        time=b"1621464827.959498503",
    )
    assert command.sent == Decimal("1621464827.959498503")
    assert command.lat_lon == (Decimal("34.068930"), Decimal("-118.445127"))


@pytest.mark.parametrize("ws", [bytes([b]) for b in WHITESPACE])
def test_each_of_the_six_whitespace_bytes_separates_fields(ws: bytes) -> None:
    line = ws.join([b"IAMAT", b"kiwi", b"+34-118", b"1.5"])
    command = parse_command(ws * 2 + line + ws)
    assert isinstance(command, Iamat)
    assert (command.client, command.coords, command.time) == (b"kiwi", b"+34-118", b"1.5")


def test_runs_of_mixed_whitespace_separate_fields() -> None:
    command = parse_command(b" \t\v\fIAMAT\r\n \x0bkiwi\f\f+34-118 \t 1.5\r")
    assert isinstance(command, Iamat)
    assert (command.client, command.coords, command.time) == (b"kiwi", b"+34-118", b"1.5")


@pytest.mark.parametrize("sep", NOT_SEPARATORS)
def test_non_ascii_and_control_spaces_are_part_of_the_client_id(sep: bytes) -> None:
    command = parse_command(b"IAMAT kiwi" + sep + b"x +34-118 1.5")
    assert isinstance(command, Iamat)
    assert command.client == b"kiwi" + sep + b"x"


@pytest.mark.parametrize("sep", NOT_SEPARATORS)
def test_non_ascii_and_control_spaces_do_not_split_a_line(sep: bytes) -> None:
    with pytest.raises(ProtocolError):
        parse_command(sep.join([b"IAMAT", b"kiwi", b"+34-118", b"1.5"]))


@pytest.mark.parametrize("sep", NOT_SEPARATORS)
def test_non_ascii_spaces_glued_to_numbers_make_them_invalid(sep: bytes) -> None:
    with pytest.raises(ProtocolError):
        parse_command(b"IAMAT kiwi +34-118 1.5" + sep)
    with pytest.raises(ProtocolError):
        parse_command(b"IAMAT kiwi " + sep + b"+34-118 1.5")
    with pytest.raises(ProtocolError):
        parse_command(b"WHATSAT kiwi 10" + sep + b" 5")


@pytest.mark.parametrize(
    "line",
    [
        b"iamat kiwi +34-118 1.5",
        b"Iamat kiwi +34-118 1.5",
        b"IAMTA kiwi +34-118 1.5",
        b"IAMAT\x00 kiwi +34-118 1.5",
        b"whatsat kiwi 10 5",
        b"WhatsAt kiwi 10 5",
        b"whatisat kiwi 10 5",
        b"AT Clark +0.263873786 kiwi +34-118 1.5",
        b"IAMAT kiwi +34-118",
        b"IAMAT kiwi +34-118 1.5 extra",
        b"WHATSAT kiwi 10",
        b"WHATSAT kiwi 10 5 5",
        b"",
        b"   ",
    ],
)
def test_commands_are_case_sensitive_and_have_exactly_four_fields(line: bytes) -> None:
    with pytest.raises(ProtocolError):
        parse_command(line)


def test_client_id_of_256_bytes_is_valid_and_257_is_not() -> None:
    client = b"k" * 256
    command = parse_command(b"IAMAT " + client + b" +34-118 1.5")
    assert isinstance(command, Iamat)
    assert command.client == client
    whatsat = parse_command(b"WHATSAT " + client + b" 10 5")
    assert isinstance(whatsat, Whatsat)
    assert whatsat.client == client
    with pytest.raises(ProtocolError):
        parse_command(b"IAMAT " + client + b"k +34-118 1.5")
    with pytest.raises(ProtocolError):
        parse_command(b"WHATSAT " + client + b"k 10 5")


def test_client_id_is_kept_byte_for_byte_including_invalid_utf8() -> None:
    nfc, nfd = "caf\u00e9".encode(), "cafe\u0301".encode()
    for client in (nfc, nfd, b"\xff\xfe\x80bad", b"\x1b[31mred"):
        command = parse_command(b"IAMAT " + client + b" +34-118 1.5")
        assert isinstance(command, Iamat)
        assert command.client == client


# --- coordinates --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "lat", "lon"),
    [
        (b"+34.068930-118.445127", "34.068930", "-118.445127"),
        (b"+90-180", "90", "-180"),
        (b"-90+180", "-90", "180"),
        (b"+90.000000+180.000000", "90", "180"),
        (b"+34-118", "34", "-118"),
        (b"+0+0", "0", "0"),
        (b"-0.0-0.0", "0", "0"),
        (b"+1-1", "1", "-1"),
        (b"+9.123456789012345678901234567890-9", "9.123456789012345678901234567890", "-9"),
        (b"-89.9999999999+179.9999999999", "-89.9999999999", "179.9999999999"),
    ],
)
def test_valid_coordinates_give_exact_decimal_degrees(field: bytes, lat: str, lon: str) -> None:
    assert parse_coords(field) == (Decimal(lat), Decimal(lon))


@pytest.mark.parametrize(
    "field",
    [
        b"+90.1-118",
        b"-90.000001+0",
        b"+34+180.1",
        b"+34-180.0000001",
        b"+34-181",
        b"+91+0",
        b"+100-118",  # three-digit latitude
        b"+034-118",
        b"+34-1180",  # four-digit longitude
        b"34-118",  # missing sign on latitude
        b"+34118",  # missing sign on longitude
        b"+34",
        b"++34-118",
        b"+34--118",
        b"+34.-118",
        b"+.5-118",
        b"+34-118.",
        b"+34.5.5-118",
        b"+3e1-118",
        "+\u0663\u0664-118".encode(),  # Arabic-Indic digits
        "+\uff13\uff14-118".encode(),  # fullwidth digits
        "+34\u2212118".encode(),  # U+2212 minus sign
        b"+34 -118",
        b"+34_0-118",
        b"",
        b"+34-118\x00",
    ],
)
def test_invalid_coordinates_are_refused(field: bytes) -> None:
    with pytest.raises(ProtocolError):
        parse_coords(field)
    with pytest.raises(ProtocolError):
        parse_command(b"IAMAT kiwi " + field + b" 1.5")


@pytest.mark.parametrize(
    "field",
    [
        b"+90.00000000000000000000000000001+0",  # 31 significant digits, just above 90
        b"-90.000000000000000000000000000001+0",
        b"+0+180.0000000000000000000000000001",
        b"+0-180.00000000000000000000000000000000001",
    ],
)
def test_coordinates_just_beyond_the_range_are_refused_at_any_precision(field: bytes) -> None:
    # |lat| <= 90 and |lon| <= 180 exactly: more digits than Decimal's default context
    # precision (28) must not round a too-large value down into range.
    with pytest.raises(ProtocolError):
        parse_coords(field)


# --- time ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field",
    [
        b"0",
        b"1621464827.959498503",
        b"1.0",
        b"007.500",
        b"1621464827." + b"9" * 60,
        b"99999999999999999999999999999999999999.000000000000000000000000000000000001",
    ],
)
def test_time_is_parsed_exactly(field: bytes) -> None:
    value = parse_time(field)
    assert value == Decimal(field.decode())
    assert value.as_tuple() == Decimal(field.decode()).as_tuple()  # every digit kept


@pytest.mark.parametrize(
    "field",
    [
        b"",
        b"+1",
        b"-1",
        b"1e9",
        b"1E9",
        b"1_000",
        b"nan",
        b"NaN",
        b"inf",
        b"Infinity",
        b"-inf",
        b"1.",
        b".5",
        b".",
        b"1.5.5",
        b" 1",
        b"1 ",
        b"0x10",
        "\u0661".encode(),  # Arabic-Indic one
        "\uff11".encode(),  # fullwidth one
        b"\xd9\xa1",
        b"1,5",
    ],
)
def test_time_refuses_sign_exponent_underscore_nan_inf_and_bare_dots(field: bytes) -> None:
    with pytest.raises(ProtocolError):
        parse_time(field)
    with pytest.raises(ProtocolError):
        time_ns(field)


@pytest.mark.parametrize(
    ("field", "expected"),
    [
        (b"0", 0),
        (b"1.5", 1_500_000_000),
        (b"2.000000001", 2_000_000_001),
        (b"1621464827.959498503", 1_621_464_827_959_498_503),
        (b"1621464827.9594985039999", 1_621_464_827_959_498_503),  # truncated, not rounded
        (b"0.0000000019", 1),
        (b"0.0000000009", 0),
        (b"12", 12_000_000_000),
    ],
)
def test_time_ns_truncates_beyond_nine_digits(field: bytes, expected: int) -> None:
    assert time_ns(field) == expected
    assert time_ns(field) == ns_of(field.decode())


def test_time_with_more_digits_than_python_converts_by_default_is_handled() -> None:
    # PROTOCOL.md: time is D+(.D+)?, any length; max_line may be up to 1 MiB, so a
    # 5000-digit time can arrive. It must give a value or ProtocolError, not ValueError.
    try:
        value = time_ns(b"1" * 5000)
    except ProtocolError:
        return  # refusing an absurd time is allowed; a bare ValueError is not
    assert value == (10**5000 - 1) // 9 * 10**9  # 5000 ones, as nanoseconds


# --- skew and the AT line -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("skew_ns", "expected"),
    [
        (0, b"+0.000000000"),
        (1, b"+0.000000001"),
        (-1, b"-0.000000001"),
        (263_873_786, b"+0.263873786"),
        (-959_498_503, b"-0.959498503"),
        (-1_500_000_000, b"-1.500000000"),
        (1_000_000_000, b"+1.000000000"),
        (10**18, b"+1000000000.000000000"),
        (-(10**18) - 7, b"-1000000000.000000007"),
    ],
)
def test_format_skew_has_sign_and_nine_digits(skew_ns: int, expected: bytes) -> None:
    assert format_skew(skew_ns) == expected


@given(st.integers(min_value=-(10**30), max_value=10**30))
def test_format_skew_is_exact_for_any_difference(skew_ns: int) -> None:
    text = format_skew(skew_ns)
    assert text[:1] in (b"+", b"-")
    assert text[1:2] not in (b"+", b"-")
    assert len(text.split(b".")[1]) == 9
    assert (text[:1] == b"-") == (skew_ns < 0)
    assert int(text.replace(b".", b"")) == skew_ns  # exact, no Decimal rounding


@given(
    st.one_of(
        st.from_regex(rb"\A[0-9]{1,25}(\.[0-9]{1,15})?\Z"),
        st.sampled_from([b"0", b"0.0", b"1.999999999999", b"9" * 4000 + b".5", b"9" * 4001]),
    ),
    st.integers(min_value=0, max_value=10**20),
)
def test_format_at_is_the_time_difference_as_format_skew_writes_it(
    time: bytes, received_ns: int
) -> None:
    iamat = Iamat(b"kiwi", b"+1-1", time)
    skew = format_skew(received_ns - time_ns(time))
    assert format_at(b"Clark", received_ns, iamat) == b"AT Clark %s kiwi +1-1 %s" % (skew, time)


@given(
    st.from_regex(rb"\A[!-~\x80-\xff]{1,64}\Z"),  # a client id: one field, no white space
    st.from_regex(rb"\A[0-9]{1,25}(\.[0-9]{1,15})?\Z"),
    st.integers(min_value=0, max_value=10**20),
)
def test_at_parts_join_to_the_at_line_and_to_its_packed_form(
    client: bytes, time: bytes, received_ns: int
) -> None:
    iamat = Iamat(client, b"+34.068930-118.445127", time)
    head, tail = at_parts(b"Clark", received_ns, iamat.coords, iamat.time)
    skew = format_skew(received_ns - time_ns(time))
    at_line = b"AT Clark %s %s +34.068930-118.445127 %s" % (skew, client, time)
    assert head + client + tail == at_line
    assert head + tail == pack(at_line, client)  # what client.answer stores for a new client


@given(
    st.from_regex(rb"\A[0-9]{1,18}(\.[0-9]{1,12})?\Z"),
    st.integers(min_value=-2 * 10**9, max_value=2 * 10**9),
)
def test_format_at_near_the_servers_clock_is_exact(time: bytes, skew_ns: int) -> None:
    # A client clock within a second or two of the server's (at_parts' short cuts: a
    # time in nanoseconds, a skew of less than a second), on both sides of zero.
    received_ns = time_ns(time) + skew_ns
    iamat = Iamat(b"kiwi", b"+1-1", time)
    expected = b"AT Clark %s kiwi +1-1 %s" % (format_skew(skew_ns), time)
    assert format_at(b"Clark", received_ns, iamat) == expected


def test_make_record_gives_the_classic_at_line() -> None:
    iamat = parse_command(KIWI)
    assert isinstance(iamat, Iamat)
    received = 1_621_464_828_223_372_289  # 1621464828.223372289 s
    assert skew_of(received, "1621464827.959498503") == b"+0.263873786"  # oracle check
    record = make_record(b"Clark", received, iamat)
    assert record.at_line == (
        b"AT Clark +0.263873786 kiwi.cs.ucla.edu +34.068930-118.445127 1621464827.959498503"
    )
    assert record == Record(
        client=b"kiwi.cs.ucla.edu",
        coords=b"+34.068930-118.445127",
        sent=Decimal("1621464827.959498503"),
        origin=b"Clark",
        at_line=record.at_line,
    )


def test_make_record_client_clock_ahead_gives_negative_skew() -> None:
    iamat = parse_command(b"IAMAT kiwi +34-118 1621464827.959498503")
    assert isinstance(iamat, Iamat)
    record = make_record(b"Bona", 1_621_464_827_000_000_000, iamat)
    assert record.at_line == b"AT Bona -0.959498503 kiwi +34-118 1621464827.959498503"


def test_make_record_equal_clocks_give_plus_zero() -> None:
    iamat = parse_command(b"IAMAT kiwi +34-118 1621464827")
    assert isinstance(iamat, Iamat)
    record = make_record(b"Bona", 1_621_464_827_000_000_000, iamat)
    assert record.at_line == b"AT Bona +0.000000000 kiwi +34-118 1621464827"


def test_make_record_truncates_the_time_but_echoes_every_digit() -> None:
    iamat = parse_command(b"IAMAT kiwi +34-118 1621464827.9594985039")
    assert isinstance(iamat, Iamat)
    record = make_record(b"Clark", 1_621_464_828_223_372_289, iamat)
    assert record.at_line == b"AT Clark +0.263873786 kiwi +34-118 1621464827.9594985039"
    ahead = parse_command(b"IAMAT kiwi +34-118 0.0000000019")
    assert isinstance(ahead, Iamat)
    assert make_record(b"Clark", 0, ahead).at_line.split()[2] == b"-0.000000001"


def test_make_record_echoes_fields_with_odd_bytes() -> None:
    iamat = parse_command(b"IAMAT\t\xff\xc2\xa0\x1b[1m\x85 \x0b-90.0+180.000   0001.10")
    assert isinstance(iamat, Iamat)
    record = make_record(b"Jaquez", 2_000_000_000, iamat)
    assert record.at_line == b"AT Jaquez +0.900000000 \xff\xc2\xa0\x1b[1m\x85 -90.0+180.000 0001.10"


# --- WHATSAT ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("radius", "metres"),
    [
        (b"50", 50_000),
        (b"50.0", 50_000),
        (b"50.000000", 50_000),
        (b"10", 10_000),
        (b"0.5", 500),
        (b"1.25", 1_250),
        (b"49.999", 49_999),
        (b"0.0001", 1),  # 0.1 m: never below 1 m
        (b"007", 7_000),
    ],
)
def test_valid_radius_and_its_metres(radius: bytes, metres: int) -> None:
    command = parse_command(b"WHATSAT kiwi " + radius + b" 5")
    assert command == Whatsat(b"kiwi", Decimal(radius.decode()), 5)
    assert isinstance(command, Whatsat)
    assert command.radius_m == metres


@pytest.mark.parametrize(
    "radius",
    [
        b"0",
        b"0.0",
        b"00",
        b"50.0001",
        b"50.00000000000000000000000000000001",
        b"51",
        b"-5",
        b"+5",
        b"1e1",
        b"5.",
        b".5",
        b"nan",
        b"inf",
        "\u0665".encode(),
    ],
)
def test_invalid_radius_is_refused(radius: bytes) -> None:
    with pytest.raises(ProtocolError):
        parse_command(b"WHATSAT kiwi " + radius + b" 5")


@pytest.mark.parametrize(("bound", "value"), [(b"0", 0), (b"1", 1), (b"20", 20), (b"05", 5)])
def test_bound_from_0_to_20_is_valid(bound: bytes, value: int) -> None:
    command = parse_command(b"WHATSAT kiwi 10 " + bound)
    assert isinstance(command, Whatsat)
    assert command.bound == value


@pytest.mark.parametrize(
    "bound", [b"21", b"100", b"-1", b"+1", b"1.0", b"1e1", b"\xd9\xa3", b"0x1", b"1_0"]
)
def test_invalid_bound_is_refused(bound: bytes) -> None:
    with pytest.raises(ProtocolError):
        parse_command(b"WHATSAT kiwi 10 " + bound)


def test_whatisat_is_a_synonym_of_whatsat() -> None:
    assert parse_command(b"WHATISAT kiwi 10 5") == parse_command(b"WHATSAT kiwi 10 5")
    assert parse_command(b"WHATISAT kiwi 10 5") == Whatsat(b"kiwi", Decimal(10), 5)


def test_huge_bound_or_radius_gives_protocol_error_not_value_error() -> None:
    # max_line may be configured up to 1 MiB, so a field can exceed Python's default
    # 4300-digit int conversion limit; the parser must still answer with ProtocolError.
    with pytest.raises(ProtocolError):
        parse_command(b"WHATSAT kiwi 10 " + b"1" * 5000)
    with pytest.raises(ProtocolError):
        parse_command(b"WHATSAT kiwi " + b"1" * 5000 + b" 5")


# --- AT lines between servers -------------------------------------------------------------

AT = b"AT Clark +0.263873786 kiwi.cs.ucla.edu +34.068930-118.445127 1621464827.959498503"


def test_parse_at_rebuilds_the_record() -> None:
    assert parse_at(AT) == Record(
        client=b"kiwi.cs.ucla.edu",
        coords=b"+34.068930-118.445127",
        sent=Decimal("1621464827.959498503"),
        origin=b"Clark",
        at_line=AT,
    )
    assert parse_at(b"AT Bona -12.000000000 \xff\xfe -90+180 0").at_line == (
        b"AT Bona -12.000000000 \xff\xfe -90+180 0"
    )


@pytest.mark.parametrize(
    "line",
    [
        AT + b"\n",
        AT + b"\r",
        AT + b" ",
        b" " + AT,
        AT.replace(b" ", b"  ", 1),
        AT.replace(b" ", b"\t"),
        b"at" + AT[2:],
        b"IAMAT" + AT[2:],
        AT.replace(b"+0.263873786", b"0.263873786"),
        AT.replace(b"+0.263873786", b"+0.26387378"),
        AT.replace(b"+0.263873786", b"+0.2638737860"),
        AT.replace(b"+0.263873786", b"+-0.263873786"),
        AT.replace(b"+0.263873786", b"+.263873786"),
        AT.replace(b"+0.263873786", b"+0.263873786x"),
        AT.replace(b"+34.068930", b"+94.068930"),
        AT.replace(b"+34.068930", b"34.068930"),
        AT.replace(b"1621464827.959498503", b"-1621464827.959498503"),
        AT.replace(b"1621464827.959498503", b"1e9"),
        AT.replace(b"kiwi.cs.ucla.edu", b"k" * 257),
        AT + b" extra",
        b"AT Clark +0.263873786 kiwi +34-118",
        b"AT",
        b"",
        b"PING",
        b"garbage",
    ],
)
def test_parse_at_refuses_non_canonical_and_garbage_lines(line: bytes) -> None:
    with pytest.raises(ProtocolError):
        parse_at(line)
    assert not canonical_at(line)


def test_question_echoes_the_line_exactly() -> None:
    assert question(b"  HELLO\tthere  \x0b") == b"?   HELLO\tthere  \x0b\n"
    assert question(b"") == b"? \n"
    assert question(b"\xff\r") == b"? \xff\r\n"


# --- properties ---------------------------------------------------------------------------

TOKENS = [
    b"IAMAT", b"WHATSAT", b"WHATISAT", b"AT", b" ", b"\t", b"\r", b"\x0b", b"+", b"-", b".",
    b"0", b"1", b"9", b"90", b"180", b"kiwi", b"\xa0", b"\x85", b"\xff", b"e", b"_", b"nan",
]  # fmt: skip
lines_from_tokens = st.lists(st.sampled_from(TOKENS), max_size=20).map(b"".join)
any_bytes = st.one_of(st.binary(max_size=80), lines_from_tokens)


@given(any_bytes)
def test_parse_command_gives_a_command_or_protocol_error(line: bytes) -> None:
    try:
        command = parse_command(line)
    except ProtocolError:
        return
    assert isinstance(command, Iamat | Whatsat)


@given(any_bytes)
def test_parse_at_gives_a_record_or_protocol_error(line: bytes) -> None:
    try:
        record = parse_at(line)
    except ProtocolError:
        assert not canonical_at(line)
        return
    assert record.at_line == line


@given(any_bytes)
def test_parse_time_gives_a_decimal_or_protocol_error(field: bytes) -> None:
    try:
        value = parse_time(field)
    except ProtocolError:
        return
    assert value >= 0
    assert value == Decimal(field.decode("ascii"))


@given(any_bytes)
def test_parse_coords_gives_degrees_in_range_or_protocol_error(field: bytes) -> None:
    try:
        lat, lon = parse_coords(field)
    except ProtocolError:
        return
    assert -90 <= lat <= 90  # compared exactly (abs() would round to 28 digits)
    assert -180 <= lon <= 180


@given(st.decimals(min_value=0, max_value=10**11, places=9))
def test_parse_time_round_trips_decimals(value: Decimal) -> None:
    assert parse_time(f"{value:f}".encode()) == value


SEPARATORS = st.binary(min_size=1, max_size=3).map(
    lambda b: bytes(WHITESPACE[c % len(WHITESPACE)] for c in b)
)
NON_WS = [c for c in range(256) if c not in WHITESPACE]
clients = st.lists(st.sampled_from(NON_WS), min_size=1, max_size=256).map(bytes)
digits = st.text(alphabet="0123456789", min_size=1, max_size=12)
fractions = st.one_of(st.just(""), digits.map(lambda d: "." + d))


@st.composite
def coords(draw: st.DrawFn) -> bytes:
    """Valid ISO 6709 coordinates: signs, 1-2/1-3 digit degrees, optional fractions."""
    parts = []
    for limit, width in ((90, 2), (180, 3)):
        whole = draw(st.integers(0, limit))
        text = f"{whole:0{draw(st.integers(len(str(whole)), width))}d}"
        if whole == limit:
            text += draw(st.sampled_from(["", ".0", ".000000"]))
        else:
            text += draw(fractions)
        parts.append(draw(st.sampled_from("+-")) + text)
    return "".join(parts).encode()


times = st.tuples(digits, fractions).map(lambda t: (t[0] + t[1]).encode())


@given(
    client=clients,
    where=coords(),
    when=times,
    seps=st.lists(SEPARATORS, min_size=5, max_size=5),
    edges=st.tuples(st.booleans(), st.booleans()),
    server=st.sampled_from([b"Clark", b"Bona", b"a.b-c_9"]),
    received_ns=st.integers(0, 10**21),
    verb=st.just(b"IAMAT"),
)
def test_valid_iamat_round_trips_through_the_at_line(
    client: bytes,
    where: bytes,
    when: bytes,
    seps: list[bytes],
    edges: tuple[bool, bool],
    server: bytes,
    received_ns: int,
    verb: bytes,
) -> None:
    line = (
        (seps[0] if edges[0] else b"")
        + verb + seps[1] + client + seps[2] + where + seps[3] + when
        + (seps[4] if edges[1] else b"")
    )  # fmt: skip
    command = parse_command(line)
    assert isinstance(command, Iamat)
    record = make_record(server, received_ns, command)
    fields = record.at_line.split(b" ")
    assert fields == [b"AT", server, skew_of(received_ns, when.decode()), client, where, when]
    assert parse_at(record.at_line) == record
    assert record.rank == (Decimal(when.decode()), server, where)


_COORD_TEXT = st.builds(
    lambda s1, a, f1, s2, b, f2: f"{s1}{a}{f1}{s2}{b}{f2}".encode(),
    st.sampled_from("+-"),
    st.integers(0, 999).map(str),
    st.sampled_from(["", ".0", ".000", ".5", ".0001", ".99999999999999999999999999999"]),
    st.sampled_from("+-"),
    st.integers(0, 9999).map(str),
    st.sampled_from(["", ".0", ".00", ".1", ".00000000000000000000000000001"]),
)


@given(st.one_of(_COORD_TEXT, st.binary(max_size=30)))
def test_check_coords_agrees_with_parse_coords(field: bytes) -> None:
    # check_coords is parse_coords without the Decimals, for every peer AT line.
    try:
        parse_coords(field)
    except ProtocolError:
        with pytest.raises(ProtocolError):
            check_coords(field)
    else:
        check_coords(field)


# parse_at and parse_command take one regex for a well-formed line and otherwise check
# field by field; the two must agree on every line (same result, or both refuse).
_DEGREES = st.builds(
    lambda pad, n: f"{n:0{pad}d}",
    st.integers(1, 4),
    st.sampled_from([0, 1, 8, 9, 10, 89, 90, 91, 99, 100, 179, 180, 181, 999]),
)
_FRACTION = st.sampled_from(["", ".", ".0", ".000", ".5", ".0001", ".10", ".00000000000000001"])
_COORDS_EDGE = st.builds(
    lambda s1, a, f1, s2, b, f2: f"{s1}{a}{f1}{s2}{b}{f2}".encode(),
    *(st.sampled_from("+-"), _DEGREES, _FRACTION),
    *(st.sampled_from("+-"), _DEGREES, _FRACTION),
)
_TIMES = st.sampled_from(
    [b"0", b"1621464827.959498503", b"1621464827.", b"1.5e3", b"-1.5", b"\xd9\xa1", b"1" * 300]
)
_SPACE = st.sampled_from([b" ", b" ", b" ", b"  ", b"\t", b"\x0b", b"\xa0"])
_IDS = st.one_of(
    st.sampled_from([b"kiwi", b"k" * 256, b"k" * 257, b"x\xffy"]), st.binary(max_size=6)
)


def _part(sign: str, degrees: int, pad: int, fraction: str) -> str:
    return f"{sign}{degrees:0{pad}d}{fraction}"


_EDGE_DEGREES = [0, 1, 8, 9, 10, 89, 90, 91, 99, 100, 109, 170, 179, 180, 181, 190, 999]
_EDGE_FRACTIONS = ["", ".", ".0", ".000", ".5", ".0001", ".10", ".00000000000000001", ".9"]
_EDGE_PARTS = [
    _part(sign, degrees, pad, fraction)
    for sign in "+-"
    for degrees in _EDGE_DEGREES
    for pad in (1, 2, 3, 4)
    for fraction in _EDGE_FRACTIONS
]


def test_fast_paths_check_coordinate_ranges_as_the_field_checks_do() -> None:
    # Every edge case of one coordinate, beside a valid other one: exhaustive, not sampled.
    cases = [f"{lat}-118.4".encode() for lat in _EDGE_PARTS]
    cases += [f"+34.06{lon}".encode() for lon in _EDGE_PARTS]
    accepted = 0
    for coords in cases:
        for parse, slow, line in (
            (parse_at, parse_at_fields, b"AT Clark +0.263873386 kiwi %s 12.5" % coords),
            (parse_command, parse_command_fields, b"IAMAT kiwi %s 12.5" % coords),
        ):
            try:
                expected = slow(line)
            except ProtocolError:
                with pytest.raises(ProtocolError):
                    parse(line)
            else:
                accepted += 1
                assert parse(line) == expected, line
    assert 0 < accepted < 2 * len(cases)  # both kinds of case were met


@given(
    st.sampled_from([b"AT", b"at", b"AT "]),
    st.sampled_from([b"Clark", b"", b"B\xa0x"]),
    st.sampled_from([b"+0.263873386", b"-12.000000000", b"+0.26387338", b"0.263873386"]),
    _IDS,
    st.one_of(_COORDS_EDGE, _COORD_TEXT),
    _TIMES,
    st.lists(_SPACE, min_size=5, max_size=5),
    st.sampled_from([b"", b" ", b"\r"]),
)
def test_parse_at_fast_path_agrees_with_the_field_checks(
    verb: bytes,
    origin: bytes,
    skew: bytes,
    client: bytes,
    coords: bytes,
    time: bytes,
    spaces: list[bytes],
    tail: bytes,
) -> None:
    fields = [verb, origin, skew, client, coords, time]
    line = b"".join(f + s for f, s in zip(fields, [*spaces, tail], strict=True))
    try:
        expected = parse_at_fields(line)
    except ProtocolError:
        with pytest.raises(ProtocolError):
            parse_at(line)
    else:
        assert parse_at(line) == expected
    if canonical_at(line):  # the hot path's check takes only lines parse_at accepts
        assert parse_at_fields(line).at_line == line


@given(
    st.sampled_from([b"", b" ", b"\t"]),
    st.sampled_from([b"IAMAT", b"iamat", b"IAMATX"]),
    _IDS,
    st.one_of(_COORDS_EDGE, _COORD_TEXT),
    _TIMES,
    st.lists(_SPACE, min_size=3, max_size=3),
    st.sampled_from([b"", b" ", b"\r", b" x"]),
)
def test_parse_command_fast_path_agrees_with_the_field_checks(
    head: bytes,
    verb: bytes,
    client: bytes,
    coords: bytes,
    time: bytes,
    spaces: list[bytes],
    tail: bytes,
) -> None:
    fields = [verb, client, coords, time]
    line = head + b"".join(f + s for f, s in zip(fields, [*spaces, tail], strict=True))
    try:
        expected = parse_command_fields(line)
    except ProtocolError:
        with pytest.raises(ProtocolError):
            parse_command(line)
    else:
        assert parse_command(line) == expected


_DIGITS = st.text("0123456789", min_size=1, max_size=21)


@given(_DIGITS, st.none() | _DIGITS, _DIGITS, st.none() | _DIGITS)
@example("5", None, "5", "0")  # equal, spelled differently
@example("5", "10", "5", "1")
@example("5", "05", "5", "5")
@example("5", "5", "5", "51")
@example("0005", "9", "5", "900")
@example("1" + "0" * 19, "5", "1" + "0" * 19, "4")  # the same shape: compared as bytes
@example("1" + "0" * 19, "5", "1" + "0" * 18, "45")
def test_later_compares_client_times_as_their_decimals_do(
    whole: str, frac: str | None, other_whole: str, other_frac: str | None
) -> None:
    time = whole if frac is None else f"{whole}.{frac}"
    other = other_whole if other_frac is None else f"{other_whole}.{other_frac}"
    got = later(time.encode(), other.encode())
    exact = (Decimal(time) > Decimal(other)) - (Decimal(time) < Decimal(other))
    if len(whole) > 18 or len(other_whole) > 18:
        assert got in (0, exact)  # 0: left to the caller's Records
    else:
        assert got == exact
    assert later(time.encode(), time.encode()) == 0
