-- The gateways' shared fair queue for one upstream pool (tokenlimit/fair_queue.py).
-- KEYS: 1 in-flight (zset rid -> lease deadline), 2 waiting (zset rid -> finish tag),
--       3 state (hash: "vt" virtual time, "u:<user>" the user's last finish tag,
--                "c:<rid>" the waiting request's cost/weight),
--       4 waiting leases (zset rid -> deadline: renewed by every poll of a live waiter)
-- Waiting members are "<arrival sequence>:<rid>" (state "m:<rid>" names it), so that equal
-- tags are served in arrival order (a sorted set orders equal scores by member).
-- ARGV: op, rid, user, cost/weight, capacity, now, lease, max waiting, waiting lease
-- Returns {granted (1|0|-1 refused|-2 gone), requests ahead, in flight}.
local op, rid, user = ARGV[1], ARGV[2], ARGV[3]
local share, capacity = tonumber(ARGV[4]), tonumber(ARGV[5])
local now, lease, max_waiting = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local wait_lease = tonumber(ARGV[9])

-- Leases of gateways that died run out here: a place held, or a place in the queue (a dead
-- waiter at the head would otherwise hold back everyone behind it).
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
for _, dead in ipairs(redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', now)) do
  redis.call('ZREM', KEYS[2], redis.call('HGET', KEYS[3], 'm:' .. dead) or '')
  redis.call('HDEL', KEYS[3], 'c:' .. dead, 'm:' .. dead)
end
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)

if op == 'leave' then
  redis.call('ZREM', KEYS[1], rid)
  redis.call('ZREM', KEYS[4], rid)
  redis.call('ZREM', KEYS[2], redis.call('HGET', KEYS[3], 'm:' .. rid) or '')
  redis.call('HDEL', KEYS[3], 'c:' .. rid, 'm:' .. rid)
  return {0, 0, redis.call('ZCARD', KEYS[1])}
end

if op == 'enqueue' then
  if redis.call('ZCARD', KEYS[2]) >= max_waiting then
    return {-1, redis.call('ZCARD', KEYS[2]), redis.call('ZCARD', KEYS[1])}
  end
  -- Weighted fair queueing: a request starts at the later of the virtual time and its user's
  -- last finish, and finishes cost/weight later. Lower finish tags go first.
  local vt = tonumber(redis.call('HGET', KEYS[3], 'vt') or '0')
  local last = tonumber(redis.call('HGET', KEYS[3], 'u:' .. user) or '0')
  local finish = math.max(vt, last) + share
  local member = string.format('%015d:%s', redis.call('HINCRBY', KEYS[3], 'seq', 1), rid)
  redis.call('HSET', KEYS[3], 'u:' .. user, finish, 'c:' .. rid, share, 'm:' .. rid, member)
  redis.call('ZADD', KEYS[2], finish, member)
end

local member = redis.call('HGET', KEYS[3], 'm:' .. rid)
local rank = member and redis.call('ZRANK', KEYS[2], member)
local running = redis.call('ZCARD', KEYS[1])
if not rank then
  if redis.call('ZSCORE', KEYS[1], rid) then
    return {1, 0, running}
  end
  return {-2, 0, running}
end
if rank < capacity - running then
  redis.call('ZREM', KEYS[4], rid)
  local finish = tonumber(redis.call('ZSCORE', KEYS[2], member))
  local cost = tonumber(redis.call('HGET', KEYS[3], 'c:' .. rid) or '0')
  redis.call('ZREM', KEYS[2], member)
  redis.call('HDEL', KEYS[3], 'c:' .. rid, 'm:' .. rid)
  redis.call('ZADD', KEYS[1], now + lease, rid)
  -- The virtual time advances to the start tag of what is served (start-time fair queueing).
  local vt = tonumber(redis.call('HGET', KEYS[3], 'vt') or '0')
  redis.call('HSET', KEYS[3], 'vt', math.max(vt, finish - cost))
  return {1, 0, running + 1}
end
redis.call('ZADD', KEYS[4], now + wait_lease, rid)
return {0, rank, running}
