-- wrk script for bench/bench_ra.py: each wrk thread (one connection) is one RA.
--
-- BENCH_MODE=health : GET /healthz (the baseline: the app's cheapest database request)
-- BENCH_MODE=ra     : the RA's loop: POST /next once, then GET /review/<id> -> POST
--                      /review/<id>/skip (frees the slot and hands out the next item,
--                      302 to its page, as answering does) -> GET /review/<next> ...
-- BENCH_THINK_MS=N   : wait N ms on average between an answer and the next request
--                      (0: flat out), drawn uniformly per request from LO*N to HI*N
--                      with BENCH_THINK_SPREAD="LO HI" (bench_ra.THINK_SPREAD)
--
-- Sessions come from BENCH_SESSIONS (a file, one "cookie<TAB>csrf_token" line per
-- thread, logged in beforehand). Every response is written to BENCH_OUT/lat-<n>.txt
-- as "kind status microseconds", timed with clock_gettime through LuaJIT's ffi,
-- so the Python side can give latency percentiles per kind of request (wrk's own
-- histogram mixes them).

local ffi = require("ffi")
ffi.cdef [[
  typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
  int clock_gettime(int clk_id, bench_timespec *tp);
]]
local CLOCK_MONOTONIC = 1
local ts = ffi.new("bench_timespec")
local function now_us()
  ffi.C.clock_gettime(CLOCK_MONOTONIC, ts)
  return tonumber(ts.tv_sec) * 1000000 + tonumber(ts.tv_nsec) / 1000
end

local counter = 0
function setup(thread)
  counter = counter + 1
  thread:set("tid", counter)
end

function init(args)
  math.randomseed(tid) -- each RA its own, reproducible, think times
end

local mode = os.getenv("BENCH_MODE") or "health"
local think_ms = tonumber(os.getenv("BENCH_THINK_MS") or "0")
local spread_lo, spread_hi = (os.getenv("BENCH_THINK_SPREAD") or "1 1"):match("^(%S+) (%S+)$")
spread_lo, spread_hi = tonumber(spread_lo), tonumber(spread_hi)
local user_agent = "ra-bench"
local out, cookie, csrf_body
local state, assignment, kind, started = "next", nil, nil, 0

local function start()
  out = io.open(os.getenv("BENCH_OUT") .. "/lat-" .. tid .. ".txt", "w")
  out:setvbuf("line")
  if mode == "ra" then
    local n = 0
    for line in io.lines(os.getenv("BENCH_SESSIONS")) do
      n = n + 1
      if n == tid then
        local c, t = line:match("^([^\t]+)\t([^\t]+)$")
        cookie = "session=" .. c
        csrf_body = "csrf_token=" .. t:gsub("([^%w%-%._~])", function(ch)
          return string.format("%%%02X", string.byte(ch))
        end)
      end
    end
    assert(cookie, "no session line for thread " .. tid)
  end
end

local function form(path)
  return wrk.format("POST", path, {
    ["Cookie"] = cookie, ["User-Agent"] = user_agent,
    ["Content-Type"] = "application/x-www-form-urlencoded",
  }, csrf_body)
end

function request()
  if out == nil then start() end
  started = now_us()
  if mode ~= "ra" then
    kind = "health"
    return wrk.format("GET", "/healthz", { ["User-Agent"] = user_agent })
  end
  if state == "review" then
    kind = "review"
    return wrk.format("GET", "/review/" .. assignment,
      { ["Cookie"] = cookie, ["User-Agent"] = user_agent })
  elseif state == "skip" then
    kind = "skip"
    return form("/review/" .. assignment .. "/skip")
  end
  kind = "next"
  return form("/next")
end

-- Paced runs: a client waits about think_ms after each answer before its next
-- request. A fixed wait would keep all 32 clients in step from their common start,
-- so every request would arrive in a burst of 32 (people don't click in unison).
function delay()
  if think_ms == 0 then return 0 end
  return think_ms * (spread_lo + (spread_hi - spread_lo) * math.random())
end

function response(status, headers, body)
  local elapsed = string.format("%.0f", now_us() - started)
  if mode ~= "ra" then
    out:write(kind, " ", status, " ", elapsed, "\n")
    return
  end
  -- /next and skip both answer 302 to the review page of the item handed out.
  local id = (headers["Location"] or ""):match("/review/(%d+)")
  if kind == "next" and not id then
    kind = "next_none" -- nothing left for this RA (or an error): asks again
  end
  out:write(kind, " ", status, " ", elapsed, "\n")
  if kind == "review" then
    state = (status == 200) and "skip" or "next"
  elseif id then
    assignment, state = id, "review"
  else
    state = "next"
  end
end
