-- Take the polls each board's key budget allows now (see orchestrator/store/polls.py).
-- KEYS: per board due, ready, meta, rate; then the sweeper's index last.
-- ARGV: now_ms, lease_ms, callback_offset, then per board: interval_ms (0: no budget), burst_ms, group,
--       max_jobs, early_ms, spare (1: spend unused budget on polls not due yet).
-- Returns per board: {taken: {id, seq, id, seq, ...}, next_due_ms or -1, ready_left}.
local now = tonumber(ARGV[1])
local lease = tonumber(ARGV[2])
local callback_offset = tonumber(ARGV[3])
local active = KEYS[#KEYS]
local out = {}
for b = 0, (#KEYS - 1) / 4 - 1 do
  local due, ready, meta, rate = KEYS[b*4+1], KEYS[b*4+2], KEYS[b*4+3], KEYS[b*4+4]
  local interval = tonumber(ARGV[4 + b*6])
  local burst = tonumber(ARGV[5 + b*6])
  local group = tonumber(ARGV[6 + b*6])
  local max_jobs = tonumber(ARGV[7 + b*6])
  local early = tonumber(ARGV[8 + b*6])
  local spare = tonumber(ARGV[9 + b*6])
  local moved = redis.call('ZRANGEBYSCORE', due, '-inf', now + early, 'LIMIT', 0, 2000)
  for _, id in ipairs(moved) do
    local m = redis.call('HGET', meta, id)
    local rank = 0
    if m then rank = tonumber(string.match(m, ':(.+)$')) or 0 end
    redis.call('ZADD', ready, rank, id)
    redis.call('ZREM', due, id)
  end
  local tokens = math.floor(max_jobs / group)
  local by_budget = false  -- spend what the budget leaves on polls not due yet
  local tat = tonumber(redis.call('GET', rate) or now)
  if interval > 0 then
    if tat < now then tat = now end
    local allowed = math.floor((now + burst - tat) / interval) + 1
    if allowed < 0 then allowed = 0 end
    if allowed < tokens then tokens = allowed end
    by_budget = spare == 1
  elseif tat > now then
    tokens = 0  -- no budget, but the key is paused (a provider's Retry-After)
  end
  local taken = {}
  local function take(id, from)
    local m = redis.call('HGET', meta, id)
    redis.call('HDEL', meta, id)
    redis.call('ZREM', from, id)
    taken[#taken + 1] = id
    taken[#taken + 1] = m and string.match(m, '^(%d+):') or '0'
    redis.call('ZADD', active, 'XX', now + lease, id)
  end
  if tokens > 0 then
    -- Jobs a callback woke (negative ranks) may use the whole allowance.
    for _, id in ipairs(redis.call('ZRANGEBYSCORE', ready, '-inf', '(0', 'LIMIT', 0, tokens * group)) do
      take(id, ready)
    end
    -- Scheduled polls leave half the burst to submissions: a job not yet submitted waits for nothing
    -- but the budget, a waiting job's poll is only a check (and reads many jobs per request).
    local reserve = 0
    if interval > 0 then reserve = math.floor(burst / interval / 2) end
    local left = (tokens - reserve) * group - #taken / 2
    if left > 0 then
      local popped = redis.call('ZRANGE', ready, 0, left - 1)
      for _, id in ipairs(popped) do take(id, ready) end
      left = left - #popped
    end
    -- Budget left over: read waiting jobs before their schedule says, earliest due first, but only
    -- those due within the time the budget needs to read every waiting job once (so no job is read
    -- more often than its share), and never jobs expecting a callback.
    if by_budget and left > 0 then
      local horizon = (redis.call('ZCARD', due) + redis.call('ZCARD', ready)) * interval / group
      local soon = redis.call('ZRANGEBYSCORE', due, '-inf', now + horizon, 'LIMIT', 0, left * 2)
      for _, id in ipairs(soon) do
        if left <= 0 then break end
        local m = redis.call('HGET', meta, id)
        local rank = m and tonumber(string.match(m, ':(.+)$')) or 0
        if rank < callback_offset then
          take(id, due)
          left = left - 1
        end
      end
    end
    local requests = math.ceil((#taken / 2) / group)
    if interval > 0 and requests > 0 then
      redis.call('SET', rate, tat + requests * interval, 'PX', math.ceil(burst + (requests + 1) * interval))
    end
  end
  local first = redis.call('ZRANGE', due, 0, 0, 'WITHSCORES')
  local next_due = -1
  if #first == 2 then next_due = tonumber(first[2]) end
  out[#out + 1] = {taken, next_due, redis.call('ZCARD', ready)}
end
return out
