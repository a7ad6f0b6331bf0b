"""Sans-I/O protocol machines: frames and `now` in, actions out (no zmq, asyncio or time)."""
