"""vidrt.service: the job service, many clips from one resident model per worker.

    jobs.py      the job contract: JobRequest, one clip from a request, progress events
    scaleout.py  Ray worker actors and the asyncio JobManager (queue, job table, retries)
    store.py     the job table of `vidrt serve` in SQLite beside the clips (survives restarts)
    batch.py     `vidrt batch`: a JSONL file of jobs, resumable by request
    server.py    `vidrt serve`: uvicorn + FastAPI, the routes, start/stop (Service)
    api.py       the OpenAI /v1/videos shapes and the request -> job translation
    guard.py     Host allow-list, bearer token and body cap, before any body is read
    previews.py  thumbnail and sprite sheet of a finished clip
    web/         the web page at / (plain HTML + JS over the same API)

Uses the pipeline and the package contract; the pipeline never imports it.
"""
