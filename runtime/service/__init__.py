"""vidrt.service: the job service, many clips from one resident model per worker.

    jobs.py      the job contract: JobRequest, one clip from a request, progress events
    scaleout.py  Ray worker actors and the asyncio JobManager (queue, job table, retries)
    batch.py     `vidrt batch`: a JSONL file of jobs, resumable
    server.py    `vidrt serve`: the HTTP job API in the OpenAI /v1/videos shape

Uses the pipeline and the package contract; the pipeline never imports it.
"""
