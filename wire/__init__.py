"""The wire: what agents, session servers and engines say to each other, and the
contract's model of a trajectory. Both sides of a race read it the same way.

Owns:

* ``rules``: message comparison and the turn classification that define the
  contract (extend, replay, conflict); no I/O;
* ``protocol`` and ``strictjson``: OpenAI's chat completions request, parsed as
  strictly as the contract promises; ``anthropic``: Anthropic's Messages API and
  its translation to and from chat form;
* ``streaming``: Server-Sent Events, chunks and their assembly;
* ``engine``: what an engine answers, whole or streamed, in each engine's
  dialect (OpenAI's, SGLang's);
* ``errors``: the error vocabulary a session server answers with (status,
  ``error.type``, body);
* ``ids``: session ids;
* ``listening``: the one piece of socket plumbing both the reference server and
  the chaos upstream use (accepting connections in bursts).

May import: the standard library and trio. Never ``refserver``, ``harness`` or
``sessctl``: the reference server and the harness both import it, so a judge that
treats the reference as a black box shares nothing of its internals
(``tests/test_layering.py``).
"""
