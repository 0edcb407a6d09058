"""The shared-memory step channel: messages arrive in order through a ring reused many times over, a
message larger than a slot takes the gloo path in its place, and either side stops waiting once the
other's process is gone."""

from __future__ import annotations

import queue
import threading

import pytest

from gptserve.parallel import step_channel
from gptserve.parallel.step_channel import PeerGone, StepChannel


@pytest.fixture
def channel():
    writer = StepChannel.create(num_readers=2)
    readers = [StepChannel.attach(writer.name, 2, r) for r in range(2)]
    yield writer, readers
    for reader in readers:
        reader.close()
    writer.close()


def alive() -> bool:
    return True


def test_messages_arrive_in_order_to_every_reader(channel):
    writer, readers = channel
    gloo: queue.Queue = queue.Queue()  # stands in for the gloo broadcast of oversized messages
    big = b"x" * (step_channel.SLOT_BYTES + 1)
    messages = [{"step": i, "ids": list(range(i))} for i in range(3 * step_channel.SLOTS)]
    messages[5] = big
    messages.append(None)
    got: list[list[object]] = [[], []]

    def read(r: int) -> None:
        while True:
            obj = readers[r].receive(gloo.get, alive)
            got[r].append(obj)
            if obj is None:
                return

    threads = [threading.Thread(target=read, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for message in messages:
        # an oversized message goes to the gloo stand-in once per reader (each reader takes one copy)
        writer.send(message, lambda obj: [gloo.put(obj) for _ in range(2)], alive)
    for t in threads:
        t.join(10)
    assert got == [messages, messages]


def test_writer_waits_for_a_free_slot(channel):
    writer, readers = channel
    for i in range(step_channel.SLOTS):  # fills the ring: nobody has read yet
        writer.send(i, None, alive)
    sent = threading.Event()
    threading.Thread(target=lambda: (writer.send("next", None, alive), sent.set()), daemon=True).start()
    assert not sent.wait(0.2)
    readers[0].receive(None, alive)
    assert not sent.wait(0.2)  # the other reader still holds the oldest slot
    readers[1].receive(None, alive)
    assert sent.wait(5)


def test_reader_gives_up_when_the_writer_is_gone(channel):
    _, readers = channel
    with pytest.raises(PeerGone):
        readers[0].receive(None, lambda: False)


def test_writer_gives_up_when_a_reader_is_gone(channel):
    writer, _ = channel
    for i in range(step_channel.SLOTS):
        writer.send(i, None, alive)
    with pytest.raises(PeerGone):
        writer.send("one too many", None, lambda: False)
