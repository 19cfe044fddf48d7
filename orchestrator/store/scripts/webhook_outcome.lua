-- Record the outcome of delivery ARGV[1]'s attempt: free its places and its attempt marker, adapt the
-- destination's limit, and pass the places on. While the destination's circuit is closed, the place
-- goes straight to the oldest delivery waiting in the destination's line (it holds the places from
-- now, for ARGV[8] ms, and the caller attempts or queues it: no other delivery can take the place
-- first, and no dispatcher round is waited for). Otherwise (nobody waits there, or the circuit is
-- open) the tenant's oldest waiting delivery is woken (moved to the parked lot, due now) to try again.
-- The limit (KEYS[9]; from ARGV[9] to ARGV[10], equal by default: fixed) grows by one with each
-- quick success while at least as many deliveries as the limit wait for the destination (a
-- backlog, not a burst) and halves, not below ARGV[9], with each failure or slow answer (ARGV[12] =
-- '1'): a healthy receiver need not be held to a guess of its capacity, a struggling one goes back
-- to what every destination gets (a failing one to the circuit breaker). Left alone for ARGV[7] ms,
-- it starts again from ARGV[9]. As many of the line go as the room under the limit (and the
-- tenant's cap) allows: the freed place, and one more when the limit grew (or a lease ran out);
-- with a fixed cap, the freed place (no reads for it).
-- A success closes the circuit and wakes the destination's parked deliveries (due now). A failure
-- counts; ARGV[4] failures in a row open the circuit for a cool-down of ARGV[5] ms, doubled each
-- time it opens again (a failed probe), at most ARGV[6] ms. Attempts already under way when it
-- opened count as failures but do not extend it.
-- KEYS: 1 destination active zset, 2 destination circuit hash, 3 tenant active zset,
--       4 attempt marker, 5 tenant waiting zset, 6 destination waiting zset, 7 parked lot,
--       8 destination parked zset, 9 destination limit
-- ARGV: 1 delivery id, 2 now ms, 3 ok (1|0; 'skip': no attempt was made), 4 failures to open,
--       5 cool-down ms, 6 longest cool-down ms, 7 circuit record ttl ms, 8 queue lease ms,
--       9 starting limit, 10 highest limit, 11 tenant limit (0: none), 12 slow ('1'|'0')
-- Returns {the time (ms) the circuit is open until (0: closed), the "{id}:{attempt}"s handed places
-- (at most 8)}.
local now = tonumber(ARGV[2])
local freed = redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('DEL', KEYS[4])
local open_until = 0
if ARGV[3] == '1' then
  if redis.call('EXISTS', KEYS[2]) == 1 then
    redis.call('DEL', KEYS[2])
    local parked = redis.call('ZRANGE', KEYS[8], 0, 999)
    for _, member in ipairs(parked) do
      redis.call('ZADD', KEYS[7], 'XX', ARGV[2], member)
    end
    if #parked > 0 then redis.call('ZREM', KEYS[8], unpack(parked)) end
  end
elseif ARGV[3] == '0' then
  local failures = redis.call('HINCRBY', KEYS[2], 'failures', 1)
  redis.call('HSETNX', KEYS[2], 'failing_since', ARGV[2])
  open_until = tonumber(redis.call('HGET', KEYS[2], 'open_until') or '0')
  if open_until <= now then  -- already open: a straggler does not extend it
    if failures >= tonumber(ARGV[4]) then
      local opens = redis.call('HINCRBY', KEYS[2], 'opens', 1)
      local cooldown = math.min(tonumber(ARGV[5]) * 2 ^ math.min(opens - 1, 30), tonumber(ARGV[6]))
      open_until = now + math.floor(cooldown)
      redis.call('HSET', KEYS[2], 'open_until', open_until)
    else
      open_until = 0
    end
    redis.call('PEXPIRE', KEYS[2], ARGV[7])
  end
else
  open_until = tonumber(redis.call('HGET', KEYS[2], 'open_until') or '0')
end
local places = freed  -- a fixed cap (the default): the freed place goes on, nothing to adapt
if ARGV[9] ~= ARGV[10] then
  local limit = math.min(tonumber(redis.call('GET', KEYS[9]) or ARGV[9]), tonumber(ARGV[10]))
  if ARGV[3] ~= 'skip' then
    local adapted = limit
    if ARGV[3] == '0' or ARGV[12] == '1' then
      adapted = math.max(tonumber(ARGV[9]), math.floor(limit / 2))
    elseif limit < tonumber(ARGV[10]) and redis.call('ZCARD', KEYS[6]) >= limit then
      adapted = limit + 1
    end
    if adapted ~= limit then redis.call('SET', KEYS[9], adapted, 'PX', ARGV[7]) end
    limit = adapted
  end
  -- Room: the limit less the destination's active deliveries, within the tenant's (at most 8 at once).
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
  places = math.min(limit - redis.call('ZCARD', KEYS[1]), 8)
  local tenant_limit = tonumber(ARGV[11])
  if tenant_limit > 0 then
    redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
    places = math.min(places, tenant_limit - redis.call('ZCARD', KEYS[3]))
  end
end
local handed = {}
if open_until <= now then
  local lease_end = now + tonumber(ARGV[8])
  for _ = 1, places do
    local next_in_line = redis.call('ZPOPMIN', KEYS[6])
    if not next_in_line[1] then break end
    local member = next_in_line[1]
    local id = string.match(member, '^(.*):%d+$')
    redis.call('ZADD', KEYS[1], lease_end, id)
    redis.call('ZADD', KEYS[3], lease_end, id)
    redis.call('ZREM', KEYS[5], member)
    handed[#handed + 1] = member
  end
  if #handed > 0 then
    redis.call('PEXPIRE', KEYS[1], ARGV[8])
    redis.call('PEXPIRE', KEYS[3], ARGV[8])
  end
end
if #handed == 0 then
  local woken = redis.call('ZPOPMIN', KEYS[5])
  if woken[1] then redis.call('ZADD', KEYS[7], ARGV[2], woken[1]) end
end
if open_until <= now then open_until = 0 end
return {open_until, handed}
