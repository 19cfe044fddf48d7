-- May delivery ARGV[1] go now? Per destination: at most its limit of deliveries active (queued after
-- admission, or being attempted; the limit adapts between ARGV[5] and ARGV[9], webhook_outcome.lua)
-- and a circuit breaker (open: none; half open after the cool-down: one at a time); per tenant: at
-- most ARGV[6] active (0: no cap). Holds are leases (ms scores), so a crashed worker's hold ends by
-- itself.
--   ARGV[2] = 'admit': a new delivery; on 'go' it holds its places while it waits in the queue.
--   ARGV[2] = 'attempt': about to post; a delivery already holding its places goes on; another
--     worker making this very attempt (the attempt marker) answers 'busy'.
-- 'full' puts the delivery ("{id}:{attempt}", ARGV[8]) in its destination's and its tenant's waiting
-- lines (keeping its place if already there): a finishing attempt hands its place to the
-- destination's oldest, else wakes the tenant's oldest (webhook_outcome.lua), so nothing polls for
-- a place.
-- KEYS: 1 destination active zset, 2 destination circuit hash, 3 tenant active zset,
--       4 attempt marker, 5 tenant waiting zset, 6 destination waiting zset, 7 destination limit
-- ARGV: 1 delivery id, 2 mode, 3 now ms, 4 lease ms, 5 destination's starting limit, 6 tenant limit,
--       7 attempt marker ttl ms, 8 waiting member, 9 destination's highest limit
-- Returns {verdict, wait ms, failing since ms}: go | busy | open | full
local now = tonumber(ARGV[3])
if ARGV[2] == 'attempt' then
  if not redis.call('SET', KEYS[4], '1', 'NX', 'PX', ARGV[7]) then return {'busy', 0, 0} end
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
local circuit = redis.call('HMGET', KEYS[2], 'open_until', 'failing_since')
local open_until = tonumber(circuit[1] or '0')
local failing_since = tonumber(circuit[2] or '0')
local lease_end = now + tonumber(ARGV[4])
local held = redis.call('ZSCORE', KEYS[1], ARGV[1])
if held and open_until <= now then
  redis.call('ZADD', KEYS[1], lease_end, ARGV[1])
  redis.call('ZADD', KEYS[3], lease_end, ARGV[1])
  redis.call('ZREM', KEYS[5], ARGV[8])
  redis.call('ZREM', KEYS[6], ARGV[8])
  return {'go', 0, failing_since}
end
if held then  -- the circuit opened while it waited in the queue: it gives its places back
  redis.call('ZREM', KEYS[1], ARGV[1])
  redis.call('ZREM', KEYS[3], ARGV[1])
end
local verdict = 'go'
if open_until > now then
  verdict = 'open'
else
  local limit = tonumber(ARGV[5])
  if ARGV[5] ~= ARGV[9] then  -- an adaptive limit (else a fixed cap: nothing to read)
    limit = math.min(tonumber(redis.call('GET', KEYS[7]) or ARGV[5]), tonumber(ARGV[9]))
  end
  if open_until > 0 then limit = 1 end
  local tenant_limit = tonumber(ARGV[6])
  if redis.call('ZCARD', KEYS[1]) >= limit
      or (tenant_limit > 0 and redis.call('ZCARD', KEYS[3]) >= tenant_limit) then
    verdict = 'full'
  end
end
if verdict ~= 'go' then
  if ARGV[2] == 'attempt' then redis.call('DEL', KEYS[4]) end
  if verdict == 'full' then
    redis.call('ZADD', KEYS[5], 'NX', now, ARGV[8])
    redis.call('PEXPIRE', KEYS[5], 7 * 86400000)
    redis.call('ZADD', KEYS[6], 'NX', now, ARGV[8])
    redis.call('PEXPIRE', KEYS[6], 7 * 86400000)
    return {'full', 0, failing_since}
  end
  return {'open', open_until - now, failing_since}
end
redis.call('ZADD', KEYS[1], lease_end, ARGV[1])
redis.call('ZADD', KEYS[3], lease_end, ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('PEXPIRE', KEYS[3], ARGV[4])
redis.call('ZREM', KEYS[5], ARGV[8])
redis.call('ZREM', KEYS[6], ARGV[8])
return {'go', 0, failing_since}
