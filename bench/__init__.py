"""Benchmarks: `make bench` (python -m bench.run) and the tools behind it.

run        every workload beside its baseline, results in bench/results/
workloads  the workloads and the cluster they run on (nginx volumes, mkv serve, baseline)
load       asyncio HTTP load generator, for what wrk cannot do (fan-out, redirects)
wrk        wrk runner (installed if missing) with a JSON summary hook
baseline   bare WSGI app under mkv's gunicorn settings
report     table, JSON and chart
memory     RSS of every mkv process during one large PUT
writer     group commit of the writer process under concurrent writers
profile    py-spy on the service under wrk load
cpu        CPU per request of each process (workers, writer, nginx) under wrk load
floor      mkv's own CPU per operation in one thread, nothing else running
rebuild    mkv-rebuild speed
localcluster  volumes and mkv serve for the failure benchmarks
orphans    the freeze reproduction: copies left on the volumes after DELETE
writer_restart  PUT throughput before and after a writer restart
"""
