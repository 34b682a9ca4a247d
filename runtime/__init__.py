"""What the supervisor, the coordinator and the workers share at run time:
the ipc endpoints and message packing of their ZeroMQ sockets
(``runtime.ipc``), SO_REUSEPORT sockets (``runtime.sockets``) and the log
set-up (``runtime.logs``). No package here imports another of the product's
process packages, so none of those needs to import another for these."""
