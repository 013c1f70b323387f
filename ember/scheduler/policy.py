"""Scheduling policies: the order of the waiting queue and the choice of a preemption victim.

- 'fcfs': arrival order; a preempted request goes back to the front; the victim is the request
  that joined the running set last.
- 'priority': lower `request.priority` first, then earlier `arrival_time`; the victim is the
  running request with the highest (priority, arrival_time).
"""

from __future__ import annotations

import heapq
import itertools
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Iterator

from ember.types import Request

POLICIES = ("fcfs", "priority")


def priority_key(request: Request) -> tuple[int, float]:
    """Sort key of the priority policy: lower value first, then earlier arrival."""
    return (request.priority, request.arrival_time)


class RequestQueue(ABC):
    """The waiting queue. Iteration yields requests in scheduling order."""

    @abstractmethod
    def add(self, request: Request) -> None:
        """Enqueue a new request."""

    @abstractmethod
    def prepend(self, request: Request) -> None:
        """Re-enqueue a preempted request so it is scheduled again first (policy permitting)."""

    @abstractmethod
    def peek(self) -> Request:
        """The next request to schedule (IndexError when empty)."""

    @abstractmethod
    def pop(self) -> Request:
        """Remove and return the next request to schedule (IndexError when empty)."""

    @abstractmethod
    def remove(self, request: Request) -> None:
        """Remove a request from anywhere in the queue (ValueError if absent)."""

    @abstractmethod
    def __iter__(self) -> Iterator[Request]: ...

    @abstractmethod
    def __len__(self) -> int: ...

    def __bool__(self) -> bool:
        return len(self) > 0


class FCFSQueue(RequestQueue):
    """First come, first served (a deque)."""

    def __init__(self) -> None:
        self._queue: deque[Request] = deque()

    def add(self, request: Request) -> None:
        self._queue.append(request)

    def prepend(self, request: Request) -> None:
        self._queue.appendleft(request)

    def peek(self) -> Request:
        return self._queue[0]

    def pop(self) -> Request:
        return self._queue.popleft()

    def remove(self, request: Request) -> None:
        self._queue.remove(request)

    def __iter__(self) -> Iterator[Request]:
        return iter(self._queue)

    def __len__(self) -> int:
        return len(self._queue)


class PriorityQueue(RequestQueue):
    """Lowest (priority, arrival_time) first; ties keep insertion order (a heap)."""

    def __init__(self) -> None:
        self._heap: list[tuple[int, float, int, Request]] = []
        self._counter = itertools.count()

    def add(self, request: Request) -> None:
        prio, arrival = priority_key(request)
        heapq.heappush(self._heap, (prio, arrival, next(self._counter), request))

    def prepend(self, request: Request) -> None:
        # NOTE: a preempted request keeps its own key; it is ahead of every later arrival of
        # the same priority, which is what "front of the queue" means under this policy.
        self.add(request)

    def peek(self) -> Request:
        return self._heap[0][3]

    def pop(self) -> Request:
        return heapq.heappop(self._heap)[3]

    def remove(self, request: Request) -> None:
        for i, entry in enumerate(self._heap):
            if entry[3] is request:
                self._heap[i] = self._heap[-1]
                self._heap.pop()
                heapq.heapify(self._heap)
                return
        raise ValueError(f"request {request.request_id} is not waiting")

    def __iter__(self) -> Iterator[Request]:
        return (entry[3] for entry in sorted(self._heap, key=lambda e: e[:3]))

    def __len__(self) -> int:
        return len(self._heap)


def create_request_queue(policy: str) -> RequestQueue:
    """The waiting queue for a policy name ('fcfs' or 'priority')."""
    if policy == "fcfs":
        return FCFSQueue()
    if policy == "priority":
        return PriorityQueue()
    raise ValueError(f"unknown scheduling policy {policy!r}; expected one of {POLICIES}")


def select_victim(running: list[Request], policy: str) -> Request:
    """The running request to preempt when KV blocks run out."""
    if not running:
        raise ValueError("no running request to preempt")
    if policy == "priority":
        # NOTE: among equal keys prefer the request that joined the running set last.
        return max(reversed(running), key=priority_key)
    return running[-1]
