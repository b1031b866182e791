"""gateway.messages.timestamp against protobuf's own Timestamp.FromDatetime."""

from __future__ import annotations

import datetime as dt

from google.protobuf import timestamp_pb2
from hypothesis import given
from hypothesis import strategies as st

from gateway.messages import timestamp

ZONES = st.sampled_from(
    [
        None,
        dt.UTC,
        dt.timezone(dt.timedelta(hours=3)),
        dt.timezone(dt.timedelta(hours=-9, minutes=-30)),
    ]
)


@given(st.datetimes(min_value=dt.datetime(1, 1, 2), max_value=dt.datetime(9999, 12, 30)), ZONES)
def test_the_same_instant_as_protobufs_own_conversion(
    moment: dt.datetime, zone: dt.tzinfo | None
) -> None:
    value = moment.replace(tzinfo=zone)
    expected = timestamp_pb2.Timestamp()
    expected.FromDatetime(value)
    assert timestamp(value) == expected


def test_a_moment_before_1970_keeps_its_nanos_positive() -> None:
    stamp = timestamp(dt.datetime(1969, 12, 31, 23, 59, 59, 250_000, tzinfo=dt.UTC))
    assert (stamp.seconds, stamp.nanos) == (-1, 250_000_000)
