-- wrk script: POST a chat-completion JSON body with auth and session headers.
-- Args (after `--`): <body_file> <api_key> <session_prefix> <sessions_per_thread>
-- Each thread cycles over its own sessions; requests are pre-formatted once per thread.
-- done() prints one line "BENCH_JSON {...}" with the summary and latency percentiles (us).

local threads = {}
local counter = 0

function setup(thread)
   thread:set("tid", counter)
   counter = counter + 1
   table.insert(threads, thread)
end

local requests = {}
local n = 0
local i = 0

function init(args)
   local f = assert(io.open(args[1], "rb"))
   local body = f:read("*a")
   f:close()
   local key = args[2]
   local prefix = args[3] or "bench-"
   local sessions = tonumber(args[4] or "16")
   for s = 1, sessions do
      local headers = {
         ["Content-Type"] = "application/json",
         ["Authorization"] = "Bearer " .. key,
         ["X-Session-Id"] = prefix .. tid .. "-" .. s,
      }
      requests[s] = wrk.format("POST", nil, headers, body)
   end
   n = sessions
end

function request()
   i = i % n + 1
   return requests[i]
end

function done(summary, latency, reqs)
   local e = summary.errors
   io.write(string.format(
      'BENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,' ..
      '"write":%d,"status":%d,"timeout":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,' ..
      '"mean_us":%.1f,"max_us":%d}\n',
      summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write,
      e.status, e.timeout, latency:percentile(50), latency:percentile(90),
      latency:percentile(99), latency.mean, latency.max))
end
